// The processes behind ngx.pipe (api/pipe.cpp): starting a command with
// its standard streams on pipes, its limits, learning when it ended.
//
// nginx's SIGCHLD handler in a worker reaps every child with waitpid(-1)
// and logs it as an "unknown process" (at alert when a signal ended it),
// so a command must never be the worker's own child. Each command runs
// under a supervisor: a copy of the worker made with clone(2) whose exit
// signal is 0 (no SIGCHLD to the worker; waitpid(-1) without __WALL does
// not see it). The supervisor forks the command, waits for it and writes
// its wait status on a pipe, then exits; the worker learns that through
// the supervisor's pidfd, an nginx read event like a socket's, and reaps
// the supervisor itself. nginx's signal handling is left as it is.
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <string>
#include <vector>

#include "ngx/module.hpp"

namespace luaguard::pipe {

// lua_pipe_limits: the rlimits a command starts with. RLIM_INFINITY:
// the worker's own limit is kept.
enum Limit { kCpu, kMemory, kProcesses, kFiles, kCore, kLimitCount };

struct Limits {
    rlim_t value[kLimitCount];
};

// The limits when no lua_pipe_limits applies (docs/directives.md).
const Limits &defaultLimits();

// The lua_pipe_limits directive: name=value pairs, `off` for no limit.
char *setLimits(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);

// One started command, malloc'd; its owner (the Lua object) and the
// worker's list of live commands share it until the supervisor is reaped.
struct Child {
    pid_t              pid;        // the command, leader of its own group
    pid_t              sup;        // its supervisor, the worker's child
    int                status_fd;  // the supervisor's report, read end
    ngx_connection_t  *exit_c;     // on the supervisor's pidfd; null once
                                   // reaped
    bool               exited;     // the command's status is known
    int                status;     // its wait status
    // Called once the command's status is known (the owner's hook);
    // null when the owner let go: the Child is then freed.
    void             (*on_exit)(Child *c);
    void              *data;
    Child             *prev;
    Child             *next;
};

struct Command {
    std::vector<std::string>  argv;
    std::vector<std::string>  env;     // "NAME=value" each
    bool                      merge_stderr = false;
    const Limits             *limits = nullptr;
};

// Starts `cmd`. fds receives the worker's ends of the command's stdin,
// stdout and stderr (non-blocking, close-on-exec; stderr -1 when merged
// into stdout). Null with *err when the command could not be started
// (exec's failure included: "exec failed: no such file or directory").
Child *spawn(const Command &cmd, ngx_log_t *log, int fds[3],
             std::string *err);

// SIGKILL to the command's process group: the command and what it forked
// and did not move out of the group, even after the command itself ended.
void killGroup(Child *c);

// The owner lets go: freed now when the supervisor was reaped, else once
// it is.
void release(Child *c);

// At worker exit: every command still running is killed and every
// supervisor reaped.
void workerExit();

}  // namespace luaguard::pipe
