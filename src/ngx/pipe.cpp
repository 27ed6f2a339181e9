// Starting ngx.pipe's commands: see pipe.hpp for why each runs under a
// supervisor. Between clone(2) and execve(2) only system calls run: the
// copy of the worker has one thread, and a lock another worker thread (the
// budget watchdog) held at the clone stays held there, so nothing may
// allocate or take a lock.

#include "ngx/pipe.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <new>

#include "ngx/entry.hpp"

namespace luaguard::pipe {

namespace {

#ifndef P_PIDFD
constexpr idtype_t P_PIDFD = static_cast<idtype_t>(3);
#endif
constexpr uint64_t kClonePidfd = 0x00001000;   // CLONE_PIDFD
constexpr unsigned kCloseRangeCloexec = 1u << 2;

// struct clone_args of <linux/sched.h>, whose CLONE_* macros clash with
// glibc's.
struct CloneArgs {
    uint64_t flags;
    uint64_t pidfd;
    uint64_t child_tid;
    uint64_t parent_tid;
    uint64_t exit_signal;
    uint64_t stack;
    uint64_t stack_size;
    uint64_t tls;
};

constexpr rlim_t kMiB = 1024 * 1024;

const Limits kDefaults = {{
    60,                  // cpu: seconds
    2048 * kMiB,         // memory: address space
    1024,                // processes of the worker's user
    1024,                // open files
    0,                   // core files
}};

const int kResource[kLimitCount] = {RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC,
                                    RLIMIT_NOFILE, RLIMIT_CORE};

const char *const kLimitName[kLimitCount] = {"cpu", "memory", "processes",
                                             "files", "core"};

Child *g_children;   // commands whose supervisor is not reaped yet

// Everything the supervisor and the command need, prepared before the
// clone: after it nothing is allocated.
struct Setup {
    char *const  *argv;
    char *const  *envp;
    const char  *const *paths;    // where argv[0] may be, in order
    const Limits *limits;
    int           stdin_r;
    int           stdout_w;
    int           stderr_w;       // -1: merged into stdout
    int           exec_w;         // errno of a failed exec
    int           status_w;       // the supervisor's report
    pid_t         worker;
};

void writeAll(int fd, const void *p, size_t n)
{
    auto *b = static_cast<const char *>(p);
    while (n > 0) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return;
        }
        b += w;
        n -= static_cast<size_t>(w);
    }
}

// Reads exactly n bytes (blocking); false at an early end.
bool readAll(int fd, void *p, size_t n)
{
    auto *b = static_cast<char *>(p);
    while (n > 0) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return false;
        }
        b += r;
        n -= static_cast<size_t>(r);
    }
    return true;
}

// Everything from fd 3 on closes at the exec: nginx keeps its listening
// sockets, logs and the connections of other requests without
// close-on-exec.
void closeOnExecFrom3()
{
    if (syscall(SYS_close_range, 3u, ~0u, kCloseRangeCloexec) == 0) {
        return;
    }
    struct rlimit rl;
    rlim_t max = 65536;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < max) {
        max = rl.rlim_cur;
    }
    for (rlim_t fd = 3; fd < max; fd++) {
        fcntl(static_cast<int>(fd), F_SETFD, FD_CLOEXEC);
    }
}

void applyLimits(const Limits *l)
{
    for (int i = 0; i < kLimitCount; i++) {
        rlim_t v = l->value[i];
        if (v == RLIM_INFINITY) {
            continue;
        }
        struct rlimit rl;
        if (getrlimit(kResource[i], &rl) != 0) {
            continue;
        }
        // Hard too: the command may not raise them again.
        if (rl.rlim_max != RLIM_INFINITY && v > rl.rlim_max) {
            v = rl.rlim_max;
        }
        rl.rlim_cur = rl.rlim_max = v;
        setrlimit(kResource[i], &rl);
    }
}

[[noreturn]] void runCommand(const Setup &s, pid_t supervisor)
{
    // Its own process group: killGroup reaches what it forks.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != supervisor) {
        _exit(127);
    }
    dup2(s.stdin_r, 0);
    dup2(s.stdout_w, 1);
    dup2(s.stderr_w >= 0 ? s.stderr_w : s.stdout_w, 2);
    closeOnExecFrom3();
    applyLimits(s.limits);
    int err = ENOENT;
    for (const char *const *p = s.paths; *p; p++) {
        execve(*p, s.argv, s.envp);
        // execvp's rule: a later directory may still have it, but a
        // permission error is what is reported when none does.
        if (errno != ENOENT && errno != ENOTDIR) {
            err = errno;
        }
    }
    writeAll(s.exec_w, &err, sizeof(err));
    _exit(127);
}

// The handlers a worker has (nginx's) must not run in the supervisor:
// nginx's SIGCHLD handler would reap the command and log it.
void defaultSignals()
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP) {
            sigaction(sig, &sa, nullptr);
        }
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
}

[[noreturn]] void supervise(const Setup &s)
{
    defaultSignals();
    // The worker died (crashed) before or after this point: so do we, and
    // the command with us (its own death signal).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != s.worker) {
        _exit(1);
    }
    pid_t self = static_cast<pid_t>(syscall(SYS_getpid));
    // A plain fork without glibc's fork handlers (they take locks).
    long pid = syscall(SYS_clone, SIGCHLD, 0, nullptr, nullptr, 0);
    if (pid == 0) {
        runCommand(s, self);
    }
    int report = pid > 0 ? static_cast<int>(pid) : -errno;
    writeAll(s.status_w, &report, sizeof(report));
    if (pid < 0) {
        _exit(1);
    }
    // Only the report pipe stays: the worker's end of the exec pipe must
    // see its end once the command has exec'd.
    if (s.status_w > 3) {
        syscall(SYS_close_range, 3u, static_cast<unsigned>(s.status_w - 1),
                0u);
    }
    syscall(SYS_close_range, static_cast<unsigned>(s.status_w + 1), ~0u, 0u);
    int status = 0;
    while (waitpid(static_cast<pid_t>(pid), &status, 0) < 0) {
        if (errno != EINTR) {
            status = SIGKILL;   // cannot happen: it is our child
            break;
        }
    }
    writeAll(s.status_w, &status, sizeof(status));
    _exit(0);
}

pid_t cloneSupervisor(int *pidfd)
{
    // Exit signal 0: the worker is sent no SIGCHLD for it, and nginx's
    // waitpid(-1) does not wait for such a child.
    CloneArgs a;
    memset(&a, 0, sizeof(a));
    a.flags = kClonePidfd;
    a.pidfd = reinterpret_cast<uintptr_t>(pidfd);
    a.exit_signal = 0;
    long r = syscall(SYS_clone3, &a, sizeof(a));
    if (r < 0 && errno == ENOSYS) {
        r = syscall(SYS_clone, kClonePidfd, 0, pidfd, nullptr, 0);
    }
    return static_cast<pid_t>(r);
}

void closeFd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

std::string errnoText(const char *what, int err)
{
    std::string s = std::string(what) + ": " + strerror(err);
    for (size_t i = strlen(what) + 2; i < s.size(); i++) {
        s[i] = static_cast<char>(tolower(static_cast<unsigned char>(s[i])));
    }
    return s;
}

void unlink(Child *c)
{
    (c->prev ? c->prev->next : g_children) = c->next;
    if (c->next) {
        c->next->prev = c->prev;
    }
    c->prev = c->next = nullptr;
}

// The supervisor ended: the command's status is on the report pipe (or
// the supervisor was killed, and with it the command).
void reap(Child *c, bool block)
{
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    int fd = c->exit_c->fd;
    while (waitid(P_PIDFD, static_cast<id_t>(fd), &si,
                  WEXITED | __WALL | (block ? 0 : WNOHANG)) < 0
           && errno == EINTR)
    {
    }
    int status;
    if (!readAll(c->status_fd, &status, sizeof(status))) {
        status = SIGKILL;   // as a wait status: ended by SIGKILL
    }
    closeFd(&c->status_fd);
    ngx_close_connection(c->exit_c);
    c->exit_c = nullptr;
    c->status = status;
    c->exited = true;
    unlink(c);
}

void onExit(ngx_event_t *ev)
{
    auto *conn = static_cast<ngx_connection_t *>(ev->data);
    auto *c = static_cast<Child *>(conn->data);
    reap(c, false);
    if (c->on_exit) {
        c->on_exit(c);
    } else {
        delete c;
    }
}

// Where execve looks for argv[0]: itself when it names a path, else each
// directory of PATH (the command's own when `environ` sets one, else the
// worker's, else the usual system directories), as execvp does.
std::vector<std::string> candidates(const Command &cmd)
{
    const std::string &file = cmd.argv[0];
    if (file.find('/') != std::string::npos) {
        return {file};
    }
    const char *path = nullptr;
    for (const std::string &e : cmd.env) {
        if (e.compare(0, 5, "PATH=") == 0) {
            path = e.c_str() + 5;
        }
    }
    if (path == nullptr) {
        path = getenv("PATH");
    }
    if (path == nullptr) {
        path = "/usr/local/bin:/usr/bin:/bin";
    }
    std::vector<std::string> out;
    const char *p = path;
    for (;;) {
        const char *end = strchr(p, ':');
        std::string dir(p, end ? static_cast<size_t>(end - p) : strlen(p));
        out.push_back((dir.empty() ? std::string(".") : dir) + "/" + file);
        if (end == nullptr) {
            break;
        }
        p = end + 1;
    }
    return out;
}

}  // namespace

const Limits &defaultLimits()
{
    return kDefaults;
}

char *setLimits(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto **slot = reinterpret_cast<const Limits **>(
        static_cast<char *>(conf) + cmd->offset);
    if (*slot != nullptr) {
        return const_cast<char *>("is duplicate");
    }
    auto *l = static_cast<Limits *>(ngx_palloc(cf->pool, sizeof(Limits)));
    if (l == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    *l = kDefaults;
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    for (ngx_uint_t i = 1; i < cf->args->nelts; i++) {
        ngx_str_t a = args[i];
        u_char *eq = static_cast<u_char *>(memchr(a.data, '=', a.len));
        int which = -1;
        for (int k = 0; eq && k < kLimitCount; k++) {
            size_t n = strlen(kLimitName[k]);
            if (static_cast<size_t>(eq - a.data) == n
                && ngx_strncmp(a.data, kLimitName[k], n) == 0)
            {
                which = k;
            }
        }
        if (which < 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid lua_pipe_limits \"%V\": expected "
                               "cpu=, memory=, processes=, files= or core=",
                               &a);
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        ngx_str_t v = {a.len - static_cast<size_t>(eq + 1 - a.data), eq + 1};
        if (v.len == 3 && ngx_strncmp(v.data, "off", 3) == 0) {
            l->value[which] = RLIM_INFINITY;
            continue;
        }
        ngx_int_t n;
        if (which == kCpu) {
            n = ngx_parse_time(&v, 1);
        } else if (which == kMemory || which == kCore) {
            off_t o = ngx_parse_offset(&v);
            n = o < 0 ? NGX_ERROR : static_cast<ngx_int_t>(o);
        } else {
            n = ngx_atoi(v.data, v.len);
        }
        if (n == NGX_ERROR || (n == 0 && which != kCore)) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid lua_pipe_limits value \"%V\"", &a);
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        l->value[which] = static_cast<rlim_t>(n);
    }
    *slot = l;
    return NGX_CONF_OK;
}

Child *spawn(const Command &cmd, ngx_log_t *log, int fds[3], std::string *err)
{
    int in[2] = {-1, -1}, out[2] = {-1, -1}, errs[2] = {-1, -1};
    int exec_p[2] = {-1, -1}, status_p[2] = {-1, -1};
    auto closeAll = [&] {
        for (int *p : {in, out, errs, exec_p, status_p}) {
            closeFd(&p[0]);
            closeFd(&p[1]);
        }
    };
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0
        || (!cmd.merge_stderr && pipe2(errs, O_CLOEXEC) != 0)
        || pipe2(exec_p, O_CLOEXEC) != 0 || pipe2(status_p, O_CLOEXEC) != 0)
    {
        *err = errnoText("pipe failed", errno);
        closeAll();
        return nullptr;
    }
    auto *child = new (std::nothrow) Child();
    if (child == nullptr) {
        *err = "no memory";
        closeAll();
        return nullptr;
    }

    std::vector<char *> argv, envp, paths_c;
    for (const std::string &a : cmd.argv) {
        argv.push_back(const_cast<char *>(a.c_str()));
    }
    argv.push_back(nullptr);
    for (const std::string &e : cmd.env) {
        envp.push_back(const_cast<char *>(e.c_str()));
    }
    envp.push_back(nullptr);
    std::vector<std::string> paths = candidates(cmd);
    for (const std::string &p : paths) {
        paths_c.push_back(const_cast<char *>(p.c_str()));
    }
    paths_c.push_back(nullptr);
    Setup s = {argv.data(), envp.data(), paths_c.data(),
               cmd.limits ? cmd.limits : &kDefaults,
               in[0], out[1], errs[1], exec_p[1], status_p[1], getpid()};

    int pidfd = -1;
    pid_t sup = cloneSupervisor(&pidfd);
    if (sup == 0) {
        supervise(s);
    }
    int clone_errno = errno;
    closeFd(&in[0]);
    closeFd(&out[1]);
    closeFd(&errs[1]);
    closeFd(&exec_p[1]);
    closeFd(&status_p[1]);
    if (sup < 0) {
        *err = errnoText("clone failed", clone_errno);
        closeAll();
        delete child;
        return nullptr;
    }

    // Both answers come at once: the supervisor writes the pid right after
    // its fork, the exec pipe ends at the exec (or carries its errno).
    int pid = 0, exec_errno = 0;
    if (!readAll(status_p[0], &pid, sizeof(pid))) {
        pid = -ECHILD;
    }
    if (pid > 0 && !readAll(exec_p[0], &exec_errno, sizeof(exec_errno))) {
        exec_errno = 0;
    }
    closeFd(&exec_p[0]);

    child->pid = pid > 0 ? pid : 0;
    child->sup = sup;
    child->status_fd = status_p[0];
    status_p[0] = -1;
    ngx_connection_t *ec = ngx_get_connection(pidfd, log);
    if (ec == nullptr) {
        // No connection slot to watch it with: end it here and now.
        if (pid > 0) {
            kill(-pid, SIGKILL);
        }
        kill(sup, SIGKILL);
        siginfo_t si;
        waitid(P_PIDFD, static_cast<id_t>(pidfd), &si, WEXITED | __WALL);
        close(pidfd);
        closeFd(&child->status_fd);
        delete child;
        closeAll();
        *err = "no free connection to watch the process";
        return nullptr;
    }
    ec->data = child;
    ec->read->handler = entry::edge<onExit>;
    ec->read->log = log;
    ec->write->log = log;
    child->exit_c = ec;
    child->next = g_children;
    if (g_children) {
        g_children->prev = child;
    }
    g_children = child;
    if (ngx_handle_read_event(ec->read, 0) != NGX_OK) {
        // Not watched: reaped now, after killing it.
        if (pid > 0) {
            kill(-pid, SIGKILL);
        }
        kill(sup, SIGKILL);
        reap(child, true);
        delete child;
        closeAll();
        *err = "failed to watch the process";
        return nullptr;
    }

    if (pid <= 0 || exec_errno != 0) {
        // The supervisor ends by itself; it is reaped when it has.
        release(child);
        closeAll();
        *err = pid <= 0 ? errnoText("fork failed", -pid)
                        : errnoText("exec failed", exec_errno);
        return nullptr;
    }
    for (int fd : {in[1], out[0], errs[0]}) {
        if (fd >= 0) {
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        }
    }
    fds[0] = in[1];
    fds[1] = out[0];
    fds[2] = errs[0];
    return child;
}

void killGroup(Child *c)
{
    // The group outlives its leader while what it forked runs. Its number
    // cannot name another group before the kernel's pids wrapped around.
    if (c->pid > 0) {
        kill(-c->pid, SIGKILL);
    }
}

void release(Child *c)
{
    c->on_exit = nullptr;
    c->data = nullptr;
    if (c->exit_c == nullptr) {
        delete c;
    }
}

void workerExit()
{
    for (Child *c = g_children; c; c = c->next) {
        if (c->pid > 0) {
            kill(-c->pid, SIGKILL);
        }
        kill(c->sup, SIGKILL);
    }
    while (g_children) {
        Child *c = g_children;
        reap(c, true);
        // An owner still holding it frees it in release(); the Lua side
        // is not called back while the worker goes down.
        if (c->on_exit == nullptr) {
            delete c;
        }
    }
}

}  // namespace luaguard::pipe
