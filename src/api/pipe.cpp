// require "ngx.pipe": spawn a command and talk to it over its standard
// streams without blocking the worker (lua-resty-core's ngx/pipe.md).
//
// The process side (supervisor, limits, reaping) is ngx/pipe.cpp. Here
// the Lua object: a userdata (Proc) owning the worker's ends of the pipes,
// each an nginx connection whose read or write event resumes the waiting
// thread, as the cosockets do. A Proc belongs to the request (or timer)
// that spawned it: when that ends, a cleanup in its pool kills the
// command's process group and closes the pipes, so nothing outlives the
// request and nothing points into its freed memory. The command's exit is
// learnt through pipe::Child::on_exit; __gc kills and lets go of it.
//
// One operation of each kind (write, stdout read, stderr read, wait) may
// be pending at a time, each in its own thread; a pending one is undone
// by the thread's `cancel` when the thread is killed or its request ends.

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <string>

#include "api/api.hpp"
#include "api/socket.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/pipe.hpp"
#include "ngx/thread.hpp"
#include "security/log_escape.hpp"
#include "security/sandbox.hpp"

namespace luaguard::api {

namespace {

const char kProcMeta[] = "luaguard.pipe.proc";
constexpr uint32_t kMagic = 0x70697065u;
constexpr ngx_msec_t kDefaultTimeout = 10000;
constexpr size_t kDefaultBufferSize = 4096;
// The default environment's PATH when the worker has none (nginx passes
// the worker only TZ and what `env` names).
constexpr char kSystemPath[] =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

enum class Mode : uint8_t { All, Line, Bytes, Any };
enum class St : uint8_t { Done, Again, Closed, Error };
enum Timeout { kWrite, kStdout, kStderr, kWait, kTimeouts };

struct Proc;

struct Stream {
    Proc              *proc = nullptr;
    ngx_connection_t  *c = nullptr;     // null once shut down or closed
    LuaThread         *waiter = nullptr;
    // Read side: buf[pos, end) is received and not consumed; acc is the
    // result being collected.
    std::string        buf;
    size_t             pos = 0;
    std::string        acc;
    Mode               mode = Mode::All;
    size_t             want = 0;
    bool               eof = false;       // the command closed its end
    bool               all_ended = false; // read_all met the end: the next
                                          // read answers "closed"
    std::string        err;
    // Write side: what is left of the current write().
    std::string        wbuf;
    size_t             wpos = 0;
    size_t             charged = 0;      // wbuf's, to lua_budget_memory
};

struct Proc {
    uint32_t            magic = kMagic;
    pipe::Child        *child = nullptr;
    RequestCtx         *ctx = nullptr;    // the spawning request or timer
    ngx_pool_cleanup_t *cln = nullptr;    // in ctx's pool while it lives
    ngx_log_t          *log = nullptr;
    Stream              io[3];
    bool                merged = false;
    bool                closed = false;   // killed and pipes closed
    bool                waited = false;   // wait() handed out the status
    size_t              buffer_size = kDefaultBufferSize;
    ngx_msec_t          timeout[kTimeouts] = {kDefaultTimeout,
                                              kDefaultTimeout,
                                              kDefaultTimeout,
                                              kDefaultTimeout};
    LuaThread          *waiter = nullptr;  // in wait()
    ngx_event_t         wait_ev;           // wait()'s timeout
    // The worker's objects not closed yet: at its exit, nginx wants no
    // connection left open (a command spawned outside any request lives
    // until its object is collected).
    Proc               *prev = nullptr;
    Proc               *next = nullptr;
};

Proc *g_open;

// ---- closing ----

// A write that waited is over: its copy of the data goes, and with it the
// charge to the request's lua_budget_memory (procWrite).
void dropWriteBuf(Stream *s)
{
    if (s->charged && s->proc->ctx) {
        budget::Guard::releaseExternal(&s->proc->ctx->usage, s->charged);
    }
    s->charged = 0;
    std::string().swap(s->wbuf);
    s->wpos = 0;
}

void closeStream(Stream *s)
{
    if (s->c) {
        ngx_close_connection(s->c);   // its timers and events go with it
        s->c = nullptr;
    }
    s->waiter = nullptr;
    std::string().swap(s->buf);
    std::string().swap(s->acc);
    s->pos = 0;
    dropWriteBuf(s);
}

// The command is killed (with what it forked) and the pipes closed. Its
// waiting threads are not woken: this runs when they are being killed
// (request over) or cannot exist (the object is garbage).
void finalize(Proc *p)
{
    if (p->closed) {
        return;
    }
    p->closed = true;
    (p->prev ? p->prev->next : g_open) = p->next;
    if (p->next) {
        p->next->prev = p->prev;
    }
    p->prev = p->next = nullptr;
    if (p->child) {
        pipe::killGroup(p->child);
    }
    for (Stream &s : p->io) {
        closeStream(&s);
    }
    if (p->wait_ev.timer_set) {
        ngx_del_timer(&p->wait_ev);
    }
    p->waiter = nullptr;
}

void requestGone(void *data)
{
    auto *p = static_cast<Proc *>(data);
    p->cln = nullptr;
    finalize(p);
    p->ctx = nullptr;
    p->log = ngx_cycle->log;
}

int procGc(lua_State *L)
{
    auto *p = static_cast<Proc *>(lua_touserdata(L, 1));
    if (p == nullptr || p->magic != kMagic) {
        return 0;
    }
    if (p->cln) {
        p->cln->handler = nullptr;
        p->cln = nullptr;
    }
    finalize(p);
    if (p->child) {
        pipe::release(p->child);
        p->child = nullptr;
    }
    p->magic = 0;
    p->~Proc();
    return 0;
}

// ---- the object ----

Proc *self(lua_State *L)
{
    auto *p = static_cast<Proc *>(luaL_testudata(L, 1, kProcMeta));
    if (p == nullptr || p->magic != kMagic) {
        luaL_error(L, "bad argument #1 (pipe object expected)");
    }
    return p;
}

// The object as the running code may use it: not a live request's
// object from another request (cosockets' "bad request").
Proc *use(lua_State *L)
{
    Proc *p = self(L);
    if (p->ctx && !p->closed && p->ctx != sock::currentCtx()) {
        luaL_error(L, "bad request");
    }
    return p;
}

Proc *useYielding(lua_State *L)
{
    glue::checkPhase(L, kYieldable);
    Proc *p = use(L);
    glue::checkYieldable(L);
    return p;
}

// A shut-down direction's waiting thread gets nil, "aborted" on the next
// turn of the event loop.
void abortedWake(ngx_event_t *ev)
{
    auto *t = static_cast<LuaThread *>(ev->data);
    threads::resetWake(t);
    entry::resume(t, [](lua_State *co) {
        lua_pushnil(co);
        lua_pushliteral(co, "aborted");
        return 2;
    });
}

void abortWaiter(LuaThread *t)
{
    t->cancel = nullptr;
    t->cancel_data = nullptr;
    t->wake.handler = entry::edge<abortedWake>;
    if (!t->wake.posted) {
        ngx_post_event(&t->wake, &ngx_posted_next_events);
    }
}

std::string errnoText(int err)
{
    return sock::errnoText(err);
}

// ---- reading ----

// What a read collects waits outside the VM and then becomes a Lua
// string as large: it may not take more than the request's
// lua_budget_memory still allows.
bool fits(Proc *p, size_t total)
{
    RequestCtx *ctx = p->ctx;
    if (ctx == nullptr || ctx->limits == nullptr
        || ctx->limits->memory == 0)
    {
        return true;
    }
    int64_t used = ctx->usage.mem_net > 0 ? ctx->usage.mem_net : 0;
    int64_t left = ctx->limits->memory - used;
    return left > 0 && total <= static_cast<uint64_t>(left);
}

St readProgress(Proc *p, Stream *s)
{
    for (;;) {
        if (s->mode == Mode::Bytes && s->acc.size() == s->want) {
            return St::Done;
        }
        size_t avail = s->buf.size() - s->pos;
        if (avail > 0) {
            const char *b = s->buf.data() + s->pos;
            size_t take = avail, keep = avail;
            bool done = false;
            switch (s->mode) {
            case Mode::Line:
                if (auto *nl = static_cast<const char *>(
                        memchr(b, '\n', avail)))
                {
                    keep = static_cast<size_t>(nl - b);
                    take = keep + 1;
                    done = true;
                }
                break;
            case Mode::Bytes:
                take = keep = std::min(avail, s->want - s->acc.size());
                done = s->acc.size() + take == s->want;
                break;
            case Mode::Any:
                take = keep = std::min(avail, s->want);
                done = true;
                break;
            case Mode::All:
                break;
            }
            if (!fits(p, s->acc.size() + keep)) {
                refuseMemory(p->ctx, "a pipe read");
                s->err = "not enough memory (luaguard: lua_budget_memory "
                         "exceeded by a pipe read)";
                std::string().swap(s->acc);   // no partial result: too big
                return St::Error;
            }
            s->acc.append(b, keep);
            s->pos += take;
            if (s->pos == s->buf.size()) {
                s->buf.clear();
                s->pos = 0;
            }
            if (done) {
                if (s->mode == Mode::Line && !s->acc.empty()
                    && s->acc.back() == '\r')
                {
                    s->acc.pop_back();
                }
                return St::Done;
            }
        }
        if (s->eof) {
            // Whatever reported the end, later reads answer "closed".
            s->all_ended = true;
            return s->mode == Mode::All ? St::Done : St::Closed;
        }
        s->buf.resize(p->buffer_size);
        ssize_t n = read(s->c->fd, &s->buf[0], p->buffer_size);
        if (n > 0) {
            s->buf.resize(static_cast<size_t>(n));
            s->pos = 0;
            continue;
        }
        s->buf.clear();
        s->pos = 0;
        if (n == 0) {
            s->eof = true;
            continue;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN) {
            s->c->read->ready = 0;
            return St::Again;
        }
        s->err = errnoText(errno);
        return St::Error;
    }
}

int pushRead(Stream *s, lua_State *L, St st, bool timeout)
{
    if (st == St::Done) {
        lua_pushlstring(L, s->acc.data(), s->acc.size());
        s->acc.clear();
        return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, timeout ? "timeout"
                      : st == St::Closed ? "closed" : s->err.c_str());
    if (s->mode == Mode::Any) {
        return 2;
    }
    lua_pushlstring(L, s->acc.data(), s->acc.size());
    s->acc.clear();
    return 3;
}

template <typename Push>
void finishWaiter(LuaThread **slot, LuaThread *t, Push &&push)
{
    *slot = nullptr;
    t->cancel = nullptr;
    t->cancel_data = nullptr;
    entry::resume(t, push);
}

// A pipe's read or write event: the waiting thread gets its result once
// the operation is done, failed or timed out. `progress` moves it on;
// `push` makes the thread's results (pushRead or pushWrite).
template <typename Progress>
void onPipeEvent(ngx_event_t *ev, Progress &&progress,
                 int (*push)(Stream *, lua_State *, St, bool))
{
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *s = static_cast<Stream *>(c->data);
    LuaThread *t = s->waiter;
    if (t == nullptr) {
        return;   // nobody waits now: the data waits in the pipe
    }
    if (ev->timedout) {
        ev->timedout = 0;
        finishWaiter(&s->waiter, t, [&](lua_State *co) {
            return push(s, co, St::Error, true);
        });
        return;
    }
    St st = progress(s);
    if (st == St::Again) {
        if ((ev->write ? ngx_handle_write_event(ev, 0)
                       : ngx_handle_read_event(ev, 0)) == NGX_OK)
        {
            return;
        }
        s->err = "failed to wait for the pipe";
        st = St::Error;
    }
    if (ev->timer_set) {
        ngx_del_timer(ev);
    }
    finishWaiter(&s->waiter, t, [&](lua_State *co) {
        return push(s, co, st, false);
    });
}

void onRead(ngx_event_t *ev)
{
    onPipeEvent(ev, [](Stream *s) { return readProgress(s->proc, s); },
                pushRead);
}

void cancelRead(LuaThread *t)
{
    auto *s = static_cast<Stream *>(t->cancel_data);
    if (s->waiter != t) {
        return;
    }
    s->waiter = nullptr;
    s->acc.clear();
    if (s->c && s->c->read->timer_set) {
        ngx_del_timer(s->c->read);
    }
}

int startRead(lua_State *L, int which, Mode m, size_t want)
{
    Proc *p = useYielding(L);
    if (which == 2 && p->merged) {
        return pushNilErr(L, "merged to stdout");
    }
    Stream *s = &p->io[which];
    if (s->c == nullptr || s->all_ended) {
        return pushNilErr(L, "closed");
    }
    if (s->waiter) {
        return pushNilErr(L, "pipe busy reading");
    }
    s->mode = m;
    s->want = want;
    s->acc.clear();
    St st = readProgress(p, s);
    if (st != St::Again) {
        return pushRead(s, L, st, false);
    }
    if (ngx_handle_read_event(s->c->read, 0) != NGX_OK) {
        s->err = "failed to wait for the pipe";
        return pushRead(s, L, St::Error, false);
    }
    LuaThread *t = threads::current();
    s->waiter = t;
    t->cancel = cancelRead;
    t->cancel_data = s;
    ngx_msec_t ms = p->timeout[which == 1 ? kStdout : kStderr];
    if (ms > 0) {
        ngx_add_timer(s->c->read, ms);
    }
    return glue::yield(L);
}

size_t sizeArg(lua_State *L, const char *what)
{
    if (lua_type(L, 2) != LUA_TNUMBER) {
        luaL_error(L, "bad %s argument: number expected, got %s", what,
                   luaL_typename(L, 2));
    }
    lua_Number n = lua_tonumber(L, 2);
    if (n < 0 || n != n) {
        luaL_error(L, "bad %s argument: non-negative number expected", what);
    }
    return n > 1e15 ? static_cast<size_t>(1e15) : static_cast<size_t>(n);
}

int stdoutReadAll(lua_State *L) { return startRead(L, 1, Mode::All, 0); }
int stderrReadAll(lua_State *L) { return startRead(L, 2, Mode::All, 0); }
int stdoutReadLine(lua_State *L) { return startRead(L, 1, Mode::Line, 0); }
int stderrReadLine(lua_State *L) { return startRead(L, 2, Mode::Line, 0); }

int stdoutReadBytes(lua_State *L)
{
    return startRead(L, 1, Mode::Bytes, sizeArg(L, "len"));
}

int stderrReadBytes(lua_State *L)
{
    return startRead(L, 2, Mode::Bytes, sizeArg(L, "len"));
}

size_t maxArg(lua_State *L)
{
    size_t n = sizeArg(L, "max");
    if (n == 0) {
        luaL_error(L, "bad max argument: positive number expected");
    }
    return n;
}

int stdoutReadAny(lua_State *L) { return startRead(L, 1, Mode::Any, maxArg(L)); }
int stderrReadAny(lua_State *L) { return startRead(L, 2, Mode::Any, maxArg(L)); }

// ---- writing ----

St writeProgress(Stream *s)
{
    while (s->wpos < s->wbuf.size()) {
        ssize_t n = write(s->c->fd, s->wbuf.data() + s->wpos,
                          s->wbuf.size() - s->wpos);
        if (n > 0) {
            s->wpos += static_cast<size_t>(n);
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            s->c->write->ready = 0;
            return St::Again;
        }
        if (n < 0 && errno == EPIPE) {
            return St::Closed;   // the command closed its stdin, or ended
        }
        s->err = errnoText(n < 0 ? errno : EIO);
        return St::Error;
    }
    return St::Done;
}

int pushWrite(Stream *s, lua_State *L, St st, bool timeout)
{
    size_t total = s->wbuf.size();
    dropWriteBuf(s);
    if (st == St::Done) {
        lua_pushinteger(L, static_cast<lua_Integer>(total));
        return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, timeout ? "timeout"
                      : st == St::Closed ? "closed" : s->err.c_str());
    return 2;
}

void onWrite(ngx_event_t *ev)
{
    onPipeEvent(ev, [](Stream *s) { return writeProgress(s); }, pushWrite);
}

void cancelWrite(LuaThread *t)
{
    auto *s = static_cast<Stream *>(t->cancel_data);
    if (s->waiter != t) {
        return;
    }
    s->waiter = nullptr;
    dropWriteBuf(s);
    if (s->c && s->c->write->timer_set) {
        ngx_del_timer(s->c->write);
    }
}

int procWrite(lua_State *L)
{
    Proc *p = useYielding(L);
    Stream *s = &p->io[0];
    std::string data;
    int type = lua_type(L, 2);
    if (type == LUA_TSTRING || type == LUA_TNUMBER) {
        size_t len;
        const char *d = lua_tolstring(L, 2, &len);
        data.assign(d, len);
    } else if (type == LUA_TTABLE) {
        if (!sock::flatten(L, 2, &data, 0)) {
            return luaL_error(L, "bad data argument: table too deep");
        }
    } else {
        return luaL_error(L, "bad data argument: string or table expected, "
                          "got %s", luaL_typename(L, 2));
    }
    if (s->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    if (s->waiter) {
        return pushNilErr(L, "pipe busy writing");
    }
    s->wbuf.swap(data);
    s->wpos = 0;
    St st = writeProgress(s);
    if (st != St::Again) {
        return pushWrite(s, L, st, false);
    }
    // The rest waits in wbuf, outside the Lua VM: charged to the request's
    // lua_budget_memory until the write is over. Back in `data` while the
    // charge may raise, so the unwinding frees it.
    // (A command spawned outside any request charges nobody.)
    if (p->ctx) {
        data.swap(s->wbuf);
        chargeMemory(L, data.size(), "a pipe write");
        s->wbuf.swap(data);
        s->charged = s->wbuf.size();
    }
    if (ngx_handle_write_event(s->c->write, 0) != NGX_OK) {
        s->err = "failed to wait for the pipe";
        return pushWrite(s, L, St::Error, false);
    }
    LuaThread *t = threads::current();
    s->waiter = t;
    t->cancel = cancelWrite;
    t->cancel_data = s;
    if (p->timeout[kWrite] > 0) {
        ngx_add_timer(s->c->write, p->timeout[kWrite]);
    }
    return glue::yield(L);
}

// ---- the process ----

int pushStatus(lua_State *L, int status)
{
    if (WIFSIGNALED(status)) {
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "signal");
        lua_pushinteger(L, WTERMSIG(status));
    } else {
        int code = WEXITSTATUS(status);
        lua_pushboolean(L, code == 0);
        lua_pushliteral(L, "exit");
        lua_pushinteger(L, code);
    }
    return 3;
}

void childExited(pipe::Child *c)
{
    auto *p = static_cast<Proc *>(c->data);
    LuaThread *t = p->waiter;
    if (t == nullptr) {
        return;
    }
    if (p->wait_ev.timer_set) {
        ngx_del_timer(&p->wait_ev);
    }
    p->waited = true;
    int status = c->status;
    finishWaiter(&p->waiter, t, [status](lua_State *co) {
        return pushStatus(co, status);
    });
}

void waitTimedOut(ngx_event_t *ev)
{
    auto *p = static_cast<Proc *>(ev->data);
    LuaThread *t = p->waiter;
    if (t == nullptr) {
        return;
    }
    finishWaiter(&p->waiter, t, [](lua_State *co) {
        lua_pushnil(co);
        lua_pushliteral(co, "timeout");
        return 2;
    });
}

void cancelWait(LuaThread *t)
{
    auto *p = static_cast<Proc *>(t->cancel_data);
    if (p->waiter != t) {
        return;
    }
    p->waiter = nullptr;
    if (p->wait_ev.timer_set) {
        ngx_del_timer(&p->wait_ev);
    }
}

int procWait(lua_State *L)
{
    Proc *p = useYielding(L);
    if (p->waiter) {
        return pushNilErr(L, "pipe busy waiting");
    }
    if (p->child && p->child->exited) {
        if (p->waited) {
            return pushNilErr(L, "exited");
        }
        p->waited = true;
        return pushStatus(L, p->child->status);
    }
    if (p->closed || p->child == nullptr) {
        return pushNilErr(L, "closed");
    }
    LuaThread *t = threads::current();
    p->waiter = t;
    t->cancel = cancelWait;
    t->cancel_data = p;
    if (p->timeout[kWait] > 0) {
        ngx_add_timer(&p->wait_ev, p->timeout[kWait]);
    }
    return glue::yield(L);
}

int procPid(lua_State *L)
{
    Proc *p = self(L);
    if (p->child == nullptr) {
        lua_pushnil(L);
    } else {
        lua_pushinteger(L, p->child->pid);
    }
    return 1;
}

int procKill(lua_State *L)
{
    Proc *p = use(L);
    if (lua_type(L, 2) != LUA_TNUMBER) {
        return luaL_error(L, "bad signum argument: number expected, got %s",
                          luaL_typename(L, 2));
    }
    lua_Number n = lua_tonumber(L, 2);
    if (p->child == nullptr || p->child->exited) {
        return pushNilErr(L, "exited");
    }
    if (n < 0 || n >= NSIG || n != static_cast<int>(n)) {
        return pushNilErr(L, "invalid signal");
    }
    if (kill(p->child->pid, static_cast<int>(n)) != 0) {
        return pushNilErr(L, errno == ESRCH ? "exited"
                             : errno == EINVAL ? "invalid signal"
                             : errnoText(errno).c_str());
    }
    lua_pushboolean(L, 1);
    return 1;
}

int procShutdown(lua_State *L)
{
    Proc *p = use(L);
    size_t len;
    const char *dir = luaL_checklstring(L, 2, &len);
    int which = strcmp(dir, "stdin") == 0    ? 0
                : strcmp(dir, "stdout") == 0 ? 1
                : strcmp(dir, "stderr") == 0 ? 2
                                             : -1;
    if (which < 0) {
        return luaL_error(L, "bad shutdown arg: %s", dir);
    }
    if (which == 2 && p->merged) {
        return pushNilErr(L, "merged to stdout");
    }
    if (p->closed) {
        return pushNilErr(L, "closed");
    }
    Stream *s = &p->io[which];
    if (s->waiter) {
        abortWaiter(s->waiter);
    }
    closeStream(s);
    lua_pushboolean(L, 1);
    return 1;
}

ngx_msec_t timeoutValue(lua_State *L, int idx, const char *what)
{
    if (lua_type(L, idx) != LUA_TNUMBER) {
        luaL_error(L, "bad %s: number expected, got %s", what,
                   luaL_typename(L, idx));
    }
    lua_Number n = lua_tonumber(L, idx);
    if (n < 0 || n != n) {
        luaL_error(L, "bad %s: non-negative number expected", what);
    }
    return n > 0x7fffffff ? 0x7fffffff : static_cast<ngx_msec_t>(n);
}

const char *const kTimeoutNames[kTimeouts] = {
    "write_timeout", "stdout_read_timeout", "stderr_read_timeout",
    "wait_timeout"};

int procSetTimeouts(lua_State *L)
{
    Proc *p = use(L);
    for (int i = 0; i < kTimeouts; i++) {
        if (!lua_isnoneornil(L, i + 2)) {
            p->timeout[i] = timeoutValue(L, i + 2, kTimeoutNames[i]);
        }
    }
    return 0;
}

// ---- spawn ----

// A string argument as a C string: a zero byte would cut it short.
std::string cString(lua_State *L, int idx, const char *what)
{
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    if (memchr(s, '\0', len)) {
        luaL_error(L, "bad %s: contains a zero byte", what);
    }
    return std::string(s, len);
}

// An array of strings (args, environ).
void stringArray(lua_State *L, int idx, const char *what,
                 std::vector<std::string> *out)
{
    size_t n = lua_objlen(L, idx);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, static_cast<int>(i));
        if (lua_type(L, -1) != LUA_TSTRING) {
            luaL_error(L, "bad %s: string expected at index %d, got %s",
                       what, static_cast<int>(i), luaL_typename(L, -1));
        }
        out->push_back(cString(L, -1, what));
        lua_pop(L, 1);
    }
}

const pipe::Limits *limitsOf(RequestCtx *ctx)
{
    const LocConf *lc = nullptr;
    if (ctx) {
        lc = ctx->llcf;
    } else if (ngx_cycle->conf_ctx[ngx_http_module.index]) {
        // No request (init_worker_by_lua): the http block's setting.
        auto *hc = reinterpret_cast<ngx_http_conf_ctx_t *>(
            ngx_cycle->conf_ctx[ngx_http_module.index]);
        lc = static_cast<const LocConf *>(
            hc->loc_conf[ngx_http_luaguard_module.ctx_index]);
    }
    auto *l = lc ? static_cast<const pipe::Limits *>(lc->pipe_limits)
                 : nullptr;
    return l ? l : &pipe::defaultLimits();
}

void logSpawn(ngx_log_t *log, const pipe::Command &cmd, pid_t pid,
              const std::string &err)
{
    std::string text;
    for (const std::string &a : cmd.argv) {
        text += text.empty() ? "\"" : " \"";
        appendLogEscaped(text, a.data(), a.size());
        text += '"';
    }
    if (err.empty()) {
        ngx_log_error(NGX_LOG_NOTICE, log, 0, "lua pipe spawned process %P: %s",
                      pid, text.c_str());
    } else {
        ngx_log_error(NGX_LOG_NOTICE, log, 0,
                      "lua pipe could not spawn %s: %s", text.c_str(),
                      err.c_str());
    }
}

bool attach(Proc *p, Stream *s, int fd)
{
    s->proc = p;
    if (fd < 0) {
        return true;
    }
    ngx_connection_t *c = ngx_get_connection(fd, p->log);
    if (c == nullptr) {
        close(fd);
        return false;
    }
    c->data = s;
    c->read->handler = entry::edge<onRead>;
    c->write->handler = entry::edge<onWrite>;
    c->read->log = p->log;
    c->write->log = p->log;
    s->c = c;
    return true;
}

int spawn(lua_State *L)
{
    sandbox::require(L, sandbox::Capability::Pipe);
    Run *run = glue::checkPhase(L, ~mask(Phase::Init));
    pipe::Command cmd;
    if (lua_type(L, 1) == LUA_TSTRING) {
        cmd.argv = {"/bin/sh", "-c", cString(L, 1, "args arg")};
    } else if (lua_type(L, 1) == LUA_TTABLE) {
        stringArray(L, 1, "args arg", &cmd.argv);
        if (cmd.argv.empty()) {
            return luaL_error(L, "bad args arg: non-empty table expected");
        }
    } else {
        return luaL_error(L, "bad args arg: table expected, got %s",
                          luaL_typename(L, 1));
    }

    size_t buffer_size = kDefaultBufferSize;
    ngx_msec_t timeout[kTimeouts] = {kDefaultTimeout, kDefaultTimeout,
                                     kDefaultTimeout, kDefaultTimeout};
    bool have_env = false;
    if (!lua_isnoneornil(L, 2)) {
        if (!lua_istable(L, 2)) {
            return luaL_error(L, "bad opts arg: table expected, got %s",
                              luaL_typename(L, 2));
        }
        lua_getfield(L, 2, "merge_stderr");
        cmd.merge_stderr = lua_toboolean(L, -1);
        lua_getfield(L, 2, "buffer_size");
        if (!lua_isnil(L, -1)) {
            lua_Number n = lua_tonumber(L, -1);
            if (lua_type(L, -1) != LUA_TNUMBER || n < 1 || n > (1 << 30)) {
                return luaL_error(L, "bad buffer_size option");
            }
            buffer_size = static_cast<size_t>(n);
        }
        lua_getfield(L, 2, "environ");
        if (!lua_isnil(L, -1)) {
            if (!lua_istable(L, -1)) {
                return luaL_error(L, "bad environ option: table expected, "
                                  "got %s", luaL_typename(L, -1));
            }
            stringArray(L, lua_gettop(L), "environ option", &cmd.env);
            have_env = true;
        }
        lua_pop(L, 3);
        for (int i = 0; i < kTimeouts; i++) {
            lua_getfield(L, 2, kTimeoutNames[i]);
            if (!lua_isnil(L, -1)) {
                timeout[i] = timeoutValue(L, lua_gettop(L),
                                          kTimeoutNames[i]);
            }
            lua_pop(L, 1);
        }
    }
    if (!have_env) {
        // Never the worker's environment (whatever `env` passed it for
        // Lua's os.getenv): a PATH only.
        const char *path = getenv("PATH");
        cmd.env.push_back(std::string("PATH=") + (path ? path : kSystemPath));
    }

    RequestCtx *ctx = run ? run->ctx : nullptr;
    cmd.limits = limitsOf(ctx);
    ngx_log_t *log = ctx ? ctx->r->connection->log : ngx_cycle->log;

    // The object first: what fails after the spawn must not leak the
    // process.
    void *mem = lua_newuserdata(L, sizeof(Proc));
    auto *p = new (mem) Proc();
    luaL_getmetatable(L, kProcMeta);
    lua_setmetatable(L, -2);
    ngx_pool_cleanup_t *cln = nullptr;
    if (ctx) {
        cln = ngx_pool_cleanup_add(ctx->r->pool, 0);
        if (cln == nullptr) {
            p->closed = true;
            return pushNilErr(L, "no memory");
        }
        cln->handler = nullptr;   // armed once there is something to end
    }

    int fds[3] = {-1, -1, -1};
    std::string err;
    pipe::Child *child = pipe::spawn(cmd, log, fds, &err);
    logSpawn(log, cmd, child ? child->pid : 0, err);
    if (child == nullptr) {
        p->closed = true;
        return pushNilErr(L, err.c_str());
    }
    p->child = child;
    p->next = g_open;
    if (g_open) {
        g_open->prev = p;
    }
    g_open = p;
    child->data = p;
    child->on_exit = childExited;
    p->ctx = ctx;
    p->log = log;
    p->merged = cmd.merge_stderr;
    p->buffer_size = buffer_size;
    std::copy(timeout, timeout + kTimeouts, p->timeout);
    p->wait_ev.handler = entry::edge<waitTimedOut>;
    p->wait_ev.data = p;
    p->wait_ev.log = log;
    if (cln) {
        cln->handler = entry::edge<requestGone>;
        cln->data = p;
        p->cln = cln;
    }
    bool ok = true;
    for (int i = 0; i < 3; i++) {
        ok = attach(p, &p->io[i], fds[i]) && ok;
    }
    if (!ok) {
        finalize(p);
        return pushNilErr(L, "no free connection for the pipes");
    }
    return 1;
}

}  // namespace

void closePipes()
{
    while (g_open) {
        finalize(g_open);
    }
    pipe::workerExit();
}

int openPipeModule(lua_State *L)
{
    if (luaL_newmetatable(L, kProcMeta)) {
        const luaL_Reg methods[] = {
            {"pid", procPid},
            {"wait", procWait},
            {"kill", procKill},
            {"shutdown", procShutdown},
            {"write", procWrite},
            {"set_timeouts", procSetTimeouts},
            {"stdout_read_all", stdoutReadAll},
            {"stderr_read_all", stderrReadAll},
            {"stdout_read_line", stdoutReadLine},
            {"stderr_read_line", stderrReadLine},
            {"stdout_read_bytes", stdoutReadBytes},
            {"stderr_read_bytes", stderrReadBytes},
            {"stdout_read_any", stdoutReadAny},
            {"stderr_read_any", stderrReadAny},
            {nullptr, nullptr}};
        lua_createtable(L, 0, 14);
        setFuncs(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, procGc);
        lua_setfield(L, -2, "__gc");
        lua_pushliteral(L, "ngx.pipe proc");
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
    const luaL_Reg fns[] = {{"spawn", spawn}, {nullptr, nullptr}};
    pushRestyModule(L, fns);
    return 1;
}

}  // namespace luaguard::api
