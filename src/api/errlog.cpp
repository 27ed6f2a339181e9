// ngx.errlog's capture buffer (lua_capture_error_log): every error-log
// line a worker writes, kept in memory for get_logs.
//
// lua-nginx-module needs OpenResty's patch to nginx for this (Debian's
// build answers "missing the capture error log patch"). luaguard sees the
// lines through nginx's own log writer hook: at init_process the head of
// every error_log chain (the main one, the http level's, each server's
// and location's) gets a node in front of it whose writer copies the line
// here; the original head, moved behind it, still writes the file or
// syslog as before. The head is the chain's most verbose node (nginx keeps
// chains sorted), so the capture sees every line any error_log writes.
//
// Per worker, bounded by the configured size (line bytes plus a small
// per-entry cost), oldest entries dropped first. Lines are the file's
// lines: Lua text in them was escaped by ngx.log / raw_log already.
//
// lua_vm tenants: a line logged while a VM's Lua runs (or for its
// request) is tagged with that VM; get_logs in a VM returns only its own
// lines, and the default VM also gets the lines no VM logged (nginx's
// own). Each VM has its own filter level (set_filter_level).

#include <pthread.h>

#include <deque>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "security/sandbox.hpp"

namespace luaguard::api {

namespace {

struct Entry {
    std::string  text;
    double       time;
    ngx_uint_t   level;
    const void  *vm;       // VM tag: the main lua_State; null: none
};

// What an entry costs against the configured size besides its text.
constexpr size_t kEntryCost = 32;

class Capture {
 public:
    size_t      limit = 0;     // 0: lua_capture_error_log not set
    const void *default_vm = nullptr;

    void add(ngx_uint_t level, const u_char *buf, size_t len);
    // Moves up to `max` (0: all) of `vm`'s entries into the table at
    // `idx`; returns how many.
    int take(lua_State *L, int idx, const void *vm, lua_Integer max);
    void setFilter(const void *vm, ngx_uint_t level) { filters_[vm] = level; }

 private:
    bool visible(const Entry &e, const void *vm) const
    {
        return e.vm == vm || (vm == default_vm && e.vm == nullptr);
    }

    std::deque<Entry> entries_;
    size_t bytes_ = 0;
    std::unordered_map<const void *, ngx_uint_t> filters_;
};

Capture g_capture;
// set_filter_level in init_by_lua runs in the master: kept here, the
// workers inherit it and apply it to the default VM at install.
ngx_uint_t g_init_filter = NGX_LOG_DEBUG;
// The writer re-entered (an allocation failure logged by nginx while a
// line is being stored): that line is not captured.
bool g_in_writer = false;
pthread_t g_loop_thread;

// The VM whose Lua is running, as its main state: null when no Lua runs.
const void *runningVm()
{
    Run *run = g_run;
    if (run == nullptr) {
        return nullptr;
    }
    if (run->ctx != nullptr && run->ctx->vm != nullptr) {
        return run->ctx->vm->L();
    }
    return g_capture.default_vm;
}

void Capture::add(ngx_uint_t level, const u_char *buf, size_t len)
{
    if (len > 0 && buf[len - 1] == '\n') {
        len--;
    }
    const void *vm = runningVm();
    auto it = filters_.find(vm == nullptr ? default_vm : vm);
    if (it != filters_.end() && level > it->second) {
        return;
    }
    size_t cost = len + kEntryCost;
    if (cost > limit) {
        return;
    }
    while (!entries_.empty() && bytes_ + cost > limit) {
        bytes_ -= entries_.front().text.size() + kEntryCost;
        entries_.pop_front();
    }
    ngx_time_t *tp = ngx_timeofday();
    entries_.push_back(Entry{std::string(reinterpret_cast<const char *>(buf),
                                         len),
                             static_cast<double>(tp->sec)
                                 + static_cast<double>(tp->msec) / 1000.0,
                             level, vm});
    bytes_ += cost;
}

int Capture::take(lua_State *L, int idx, const void *vm, lua_Integer max)
{
    int n = 0;
    std::deque<Entry> kept;
    for (Entry &e : entries_) {
        if ((max <= 0 || n < max) && visible(e, vm)) {
            lua_pushinteger(L, static_cast<lua_Integer>(e.level));
            lua_rawseti(L, idx, n * 3 + 1);
            lua_pushnumber(L, e.time);
            lua_rawseti(L, idx, n * 3 + 2);
            lua_pushlstring(L, e.text.data(), e.text.size());
            lua_rawseti(L, idx, n * 3 + 3);
            bytes_ -= e.text.size() + kEntryCost;
            n++;
        } else {
            kept.push_back(std::move(e));
        }
    }
    entries_.swap(kept);
    return n;
}

void captureWriter(ngx_log_t *log, ngx_uint_t level, u_char *buf, size_t len)
{
    // Other threads log too (the budget watchdog's last words, thread
    // pools): the buffer is the event loop's alone.
    if (g_in_writer || !pthread_equal(pthread_self(), g_loop_thread)) {
        return;
    }
    g_in_writer = true;
    try {
        g_capture.add(level, buf, len);
    } catch (...) {
        // Out of memory: the line is still written by the nodes behind.
    }
    g_in_writer = false;
}

// Puts the capture node in front of the chain `head` (once per chain:
// locations share their parent's chain unless they set error_log).
void hook(ngx_pool_t *pool, ngx_log_t *head,
          std::unordered_set<ngx_log_t *> &done)
{
    if (head == nullptr || !done.insert(head).second) {
        return;
    }
    auto *moved = static_cast<ngx_log_t *>(ngx_palloc(pool,
                                                      sizeof(ngx_log_t)));
    if (moved == nullptr) {
        return;
    }
    // The head's address is what configurations and connections hold:
    // it becomes the capture node, its old contents move behind it.
    *moved = *head;
    head->writer = captureWriter;
    head->wdata = &g_capture;
    head->next = moved;
}

void hookLocation(ngx_pool_t *pool, ngx_http_core_loc_conf_t *clcf,
                  std::unordered_set<ngx_log_t *> &done);

void hookTree(ngx_pool_t *pool, ngx_http_location_tree_node_t *node,
              std::unordered_set<ngx_log_t *> &done)
{
    if (node == nullptr) {
        return;
    }
    hookTree(pool, node->left, done);
    hookTree(pool, node->right, done);
    hookTree(pool, node->tree, done);
    if (node->exact != nullptr) {
        hookLocation(pool, node->exact, done);
    }
    if (node->inclusive != nullptr) {
        hookLocation(pool, node->inclusive, done);
    }
}

void hookLocation(ngx_pool_t *pool, ngx_http_core_loc_conf_t *clcf,
                  std::unordered_set<ngx_log_t *> &done)
{
    hook(pool, clcf->error_log, done);
    hookTree(pool, clcf->static_locations, done);
#if (NGX_PCRE)
    if (clcf->regex_locations != nullptr) {
        for (auto **p = clcf->regex_locations; *p != nullptr; p++) {
            hookLocation(pool, *p, done);
        }
    }
#endif
}

// The main state of the VM a Lua call runs in: the capture's VM tag.
const void *callerVm(lua_State *L)
{
    lua_getfield(L, LUA_REGISTRYINDEX, "luaguard.errlog.vm");
    const void *vm = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return vm;
}

const char kNotSet[] = "directive \"lua_capture_error_log\" is not set";

bool configured()
{
    MainConf *mcf = mainConf();
    return mcf != nullptr && mcf->capture_error_log > 0;
}

// The buffer holds other requests' lines (clients, URIs, errors):
// request code of lua_sandbox strict neither reads nor filters it.
void refuseStrict(lua_State *L, const char *fname)
{
    const sandbox::Policy *p = sandbox::currentPolicy();
    if (p != nullptr && p->strict && g_run != nullptr
        && g_run->ctx != nullptr)
    {
        luaL_error(L, "ngx.errlog.%s is not allowed in lua_sandbox strict "
                   "(the captured lines are other requests' too)", fname);
    }
}

// errlog_get(max, res): res filled from 1 with level, time, text triples
// and a nil after them; nil, err without the directive.
int getLogs(lua_State *L)
{
    lua_Integer max = luaL_checkinteger(L, 1);
    refuseStrict(L, "get_logs");
    if (!configured()) {
        return pushNilErr(L, kNotSet);
    }
    if (lua_type(L, 2) != LUA_TTABLE) {
        lua_settop(L, 1);
        lua_createtable(L, max > 0 && max < 1024 ? max * 3 + 1 : 30, 0);
    }
    int n = g_capture.limit > 0 ? g_capture.take(L, 2, callerVm(L), max) : 0;
    lua_pushnil(L);
    lua_rawseti(L, 2, n * 3 + 1);
    lua_settop(L, 2);
    return 1;
}

int setFilterLevel(lua_State *L)
{
    lua_Integer level = luaL_checkinteger(L, 1);
    refuseStrict(L, "set_filter_level");
    if (!configured()) {
        return pushNilErr(L, kNotSet);
    }
    if (level < NGX_LOG_STDERR || level > NGX_LOG_DEBUG) {
        return pushNilErr(L, "bad log level");
    }
    auto filter = static_cast<ngx_uint_t>(level);
    if (g_capture.limit == 0) {
        g_init_filter = filter;    // init_by_lua: the master
    } else {
        g_capture.setFilter(callerVm(L), filter);
    }
    lua_pushboolean(L, 1);
    return 1;
}

}  // namespace

void installErrlogCapture(ngx_cycle_t *cycle, MainConf *mcf)
{
    if (mcf->capture_error_log == 0 || mcf->vm == nullptr) {
        return;
    }
    g_loop_thread = pthread_self();
    g_capture.limit = mcf->capture_error_log;
    g_capture.default_vm = mcf->vm->L();
    g_capture.setFilter(g_capture.default_vm, g_init_filter);

    std::unordered_set<ngx_log_t *> done;
    hook(cycle->pool, &cycle->new_log, done);
    auto *http = reinterpret_cast<ngx_http_conf_ctx_t *>(
        cycle->conf_ctx[ngx_http_module.index]);
    auto *cmcf = static_cast<ngx_http_core_main_conf_t *>(
        http->main_conf[ngx_http_core_module.ctx_index]);
    hookLocation(cycle->pool, static_cast<ngx_http_core_loc_conf_t *>(
                     http->loc_conf[ngx_http_core_module.ctx_index]), done);
    auto **servers = static_cast<ngx_http_core_srv_conf_t **>(
        cmcf->servers.elts);
    for (ngx_uint_t i = 0; i < cmcf->servers.nelts; i++) {
        hookLocation(cycle->pool, static_cast<ngx_http_core_loc_conf_t *>(
                         servers[i]->ctx->loc_conf[ngx_http_core_module
                                                       .ctx_index]), done);
        if (servers[i]->named_locations != nullptr) {
            for (auto **p = servers[i]->named_locations; *p != nullptr; p++) {
                hookLocation(cycle->pool, *p, done);
            }
        }
    }
    // Accepted connections start with a copy of their server's head,
    // taken in the master before the hook existed.
    auto *ls = static_cast<ngx_listening_t *>(cycle->listening.elts);
    for (ngx_uint_t i = 0; i < cycle->listening.nelts; i++) {
        if (ls[i].logp != nullptr && done.count(ls[i].logp) != 0) {
            ls[i].log.writer = ls[i].logp->writer;
            ls[i].log.wdata = ls[i].logp->wdata;
            ls[i].log.next = ls[i].logp->next;
        }
    }
}

void addErrlogFuncs(lua_State *L)
{
    // The VM's identity for the capture's tags (L is its main state: this
    // runs when the VM is opened), kept where only C sees it.
    lua_pushlightuserdata(L, L);
    lua_setfield(L, LUA_REGISTRYINDEX, "luaguard.errlog.vm");
    const luaL_Reg fns[] = {{"errlog_get", getLogs},
                            {"errlog_set_filter", setFilterLevel},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
}

}  // namespace luaguard::api
