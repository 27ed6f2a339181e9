// Configuration structures and the request context shared by the nginx glue
// and the API areas.
#pragma once

#include <cstdint>

#include "ngx/nginx.hpp"
#include "runtime/lua.hpp"
#include "runtime/phase.hpp"
#include "runtime/vm.hpp"
#include "security/budget.hpp"

extern "C" ngx_module_t ngx_http_rewrite_module;
extern "C" __attribute__((visibility("default")))
ngx_module_t ngx_http_luaguard_module;

namespace luaguard {

class Vm;
struct LuaThread;
namespace script { struct Policy; }
namespace egress { struct Policy; }
struct RequestCtx;
namespace sandbox { struct Policy; }
namespace tls { struct Handshake; }

// One piece of Lua code attached to a directive. Inline code is compiled
// while the configuration is parsed (so `nginx -t` sees syntax errors) and
// kept as a registry reference to its factory function; file code is
// compiled on first use per worker and cached by path.
struct Handler {
    ngx_str_t                  chunkname;   // "content_by_lua(nginx.conf:12)"
    ngx_str_t                  code;        // inline source, empty for files
    ngx_http_complex_value_t  *path;        // *_by_lua_file path template
    int                        ref;         // LUA_NOREF until compiled
    VmRefs                     vm_refs;     // its factory in each lua_vm
    // Inline code: its pool of closures (runtime/code.hpp) in the VM it
    // last ran in, to skip the lookup.
    Vm                        *pool_vm;
    std::vector<int>          *pool;
    // Inline code in a location that does not isolate: the one closure
    // (a Vm cell) all its runs in `shared_vm` share.
    Vm                        *shared_vm;
    int                        shared_cell;
};

inline bool handlerSet(const Handler *h) { return h != nullptr; }

// A named VM (`lua_vm NAME`): the locations that name it run in a
// lua_State of their own in every worker, with its own memory ceiling,
// collector, PRNG, module cache, timers and cosocket pools.
struct VmSlot {
    ngx_str_t                  name;
    size_t                     memory_limit;  // unset: lua_vm_memory_limit
    Vm                        *vm;            // made at postconfiguration
};

struct MainConf {
    Vm                        *vm;          // the default VM
    ngx_array_t               *vms;         // of VmSlot *: named VMs
    ngx_str_t                  package_path;
    ngx_str_t                  package_cpath;
    Handler                   *init;
    Handler                   *init_worker;
    Handler                   *exit_worker;
    Handler                   *ssl_sess_fetch;  // ssl_session_fetch_by_lua*
    Handler                   *ssl_sess_store;  // ssl_session_store_by_lua*
    ngx_flag_t                 rewrite_no_postpone;
    ngx_flag_t                 access_no_postpone;
    ngx_http_phase_handler_pt  rewrite_handler_installed;
    bool                       need_rewrite;
    bool                       need_access;
    bool                       need_log;
    bool                       need_server_rewrite;
    ngx_uint_t                 max_pending_timers;
    ngx_uint_t                 max_running_timers;
    size_t                     vm_memory_limit;   // 0: none
    ngx_msec_t                 watchdog_grace;    // 0: never end a worker
    void                      *shdict;      // shdict::Zones, or null
    ngx_int_t                  regex_cache_max_entries;
    ngx_int_t                  regex_match_limit;
    ngx_int_t                  worker_thread_vm_pool_size;
    void                      *metrics;     // metrics::Conf (ngx/metrics.*)
    size_t                     capture_error_log;  // 0: off (api/errlog)
    ngx_uint_t                 malloc_trim;        // requests; 0: off
    ngx_flag_t                 sa_restart;
    ngx_uint_t                 thread_cache_max_entries;
    ngx_array_t               *preloads;    // capi::Preload (ngx/capi.cpp)
    // Of EnvView: every (VM, sandbox policy) pair a location has, whose
    // view each worker builds once init_worker_by_lua has run.
    ngx_array_t               *env_views;
};

struct EnvView {
    VmSlot                    *vm_slot;     // null: the default VM
    const sandbox::Policy     *policy;      // null: the default policy
};

struct SrvConf {
    Handler                   *server_rewrite;
    // balancer_by_lua* of an upstream block (ngx/balancer.cpp): the
    // handler and the balancer it wraps.
    Handler                   *balancer;
    Handler                   *ssl_cert;    // ssl_certificate_by_lua*
    Handler                   *ssl_client_hello;  // ssl_client_hello_by_lua*
    ngx_http_upstream_init_pt  balancer_init_upstream;
    ngx_http_upstream_init_peer_pt balancer_init_peer;
};

struct LocConf {
    Handler                   *rewrite;
    Handler                   *access;
    Handler                   *content;
    Handler                   *log;
    Handler                   *header_filter;
    Handler                   *body_filter;
    ngx_flag_t                 code_cache;
    ngx_flag_t                 need_request_body;
    ngx_flag_t                 use_default_type;
    ngx_flag_t                 transform_underscores;
    ngx_flag_t                 http10_buffering;
    ngx_flag_t                 check_client_abort;

    // Cosocket destinations (lua_egress, docs/security.md).
    ngx_array_t               *egress_rules;      // of egress::Rule *
    ngx_flag_t                 egress_default;    // 1: allow
    const egress::Policy      *egress;            // built at merge

    // *_by_lua_file loading (docs/security.md).
    ngx_str_t                  file_root;
    ngx_uint_t                 file_writable;     // script::Writable
    ngx_array_t               *file_owners;       // of ngx_str_t
    const script::Policy      *script_policy;     // built at merge

    // Execution budgets for request code (0: off).
    ngx_msec_t                 budget_slice;
    ngx_msec_t                 budget_request;
    off_t                      budget_memory;
    ngx_uint_t                 budget_status;
    // lua_budget_output: 1 (wait) when output the client has not taken
    // would exceed budget_memory, 0 (error) to stop the request.
    ngx_uint_t                 budget_output_wait;
    budget::Limits             limits;            // the three above, merged

    // The same for timer callbacks created in this location.
    ngx_msec_t                 budget_timer_slice;
    ngx_msec_t                 budget_timer;
    budget::Limits             timer_limits;
    // What the timers created in this location may hold together, per
    // worker (ngx/timers.cpp, docs/budgets.md "Timers"): pending timers,
    // bytes parked in their arguments (0: off), and the Lua time their
    // callbacks may use per interval (0: off).
    ngx_uint_t                 timer_max_pending;
    off_t                      timer_max_memory;
    ngx_msec_t                 timer_cpu;
    ngx_msec_t                 timer_cpu_interval;
    void                      *timer_account;  // per worker, lazily made
    const sandbox::Policy     *sandbox;      // lua_sandbox; null: default
    VmSlot                    *vm_slot;      // lua_vm; null: default VM

    // Cosockets (api/socket_*.cpp).
    ngx_msec_t                 socket_connect_timeout;
    ngx_msec_t                 socket_send_timeout;
    ngx_msec_t                 socket_read_timeout;
    ngx_msec_t                 socket_keepalive_timeout;
    size_t                     socket_buffer_size;
    size_t                     socket_send_lowat;
    ngx_uint_t                 socket_pool_size;
    ngx_uint_t                 socket_max_per_request;
    ngx_flag_t                 socket_log_errors;
    ngx_str_t                  ssl_trusted_certificate;
    ngx_int_t                  ssl_verify_depth;
    ngx_uint_t                 ssl_protocols;
    ngx_str_t                  ssl_ciphers;
    ngx_str_t                  ssl_crl;           // lua_ssl_crl
    ngx_array_t               *ssl_conf_commands; // of ngx_keyval_t
    void                      *ssl;     // ngx_ssl_t, built on first use
    void                      *metrics;  // metrics::Loc: counters' slot
    // lua_pipe_limits (ngx/pipe.hpp's Limits); null: unset.
    const void                *pipe_limits;
};

// Where a phase's Lua thread is: not started, suspended on an event, or
// finished with the nginx return code kept for the re-entry of the phase.
enum class ThreadState : uint8_t { Idle, Running, Done };

struct PhaseRun {
    ThreadState  state = ThreadState::Idle;
    ngx_int_t    rc = NGX_DECLINED;
};

// Per-request state. Allocated in r->pool; registry references are released
// by a pool cleanup, so a request that dies while its thread is suspended
// frees everything it anchored.
struct RequestCtx {
    ngx_http_request_t  *r;
    Vm                  *vm;
    LocConf             *llcf;

    // Registry references owned by this request.
    int                  ctx_cell = 0;           // ngx.ctx table (Vm cell)
    int                  env_cell = 0;           // its globals (Vm::hold)
    EnvClosures          env_closures;           // made with env_cell

    // The Lua threads of the phase running now (see ngx/thread.hpp).
    LuaThread           *entry = nullptr;
    LuaThread           *threads = nullptr;      // every thread, linked
    Phase                thread_phase = Phase::None;
    int                  live_user = 0;          // user threads not dead
    // Threads ready to go on (a spawner, a coroutine.yield), in order.
    LuaThread           *runq_head = nullptr;
    LuaThread           *runq_tail = nullptr;
    bool                 draining = false;       // drain() is on the stack
    bool                 entry_done = false;
    bool                 entry_failed = false;
    bool                 is_timer = false;       // a fake request (timers,
                                                 // TLS handshakes)
    tls::Handshake      *handshake = nullptr;    // the TLS phases
    void               (*on_done)(RequestCtx *) = nullptr;  // timers
    const budget::Limits *limits = nullptr;      // budgets of its Lua runs
    const sandbox::Policy *env_policy = nullptr; // policy env_cell was made for
    // Its environment reached something that outlives the request (a
    // closure, getfenv, _G, ...): never handed to another request.
    bool                 env_escaped = false;

    PhaseRun             server_rewrite;
    PhaseRun             rewrite;
    PhaseRun             access;
    PhaseRun             content;

    // ngx.exit / ngx.exec / ngx.redirect end the thread through a yield;
    // these record what the driver does once the thread is unwound.
    ngx_int_t            exit_code = 0;
    bool                 exited = false;
    ngx_int_t            load_status = 0;   // a *_by_lua_file not loaded
    // ngx.exit(status) in header_filter_by_lua replaced the response with
    // nginx's page for status; the filter runs again on that page.
    bool                 header_filter_exited = false;
    ngx_str_t            exec_uri = ngx_null_string;
    ngx_str_t            exec_args = ngx_null_string;

    bool                 headers_sent_by_lua = false;
    bool                 mime_set = false;        // Lua set/cleared the type
    bool                 eof = false;
    bool                 body_read = false;
    bool                 reading_body = false;
    bool                 body_sync = false;       // reader may call back inline
    bool                 in_content_phase = false;
    bool                 in_body_filter = false;
    bool                 buffering = false;      // lua_http10_buffering
    bool                 buffering_done = false;
    bool                 cleaned = false;

    ngx_chain_t         *buffered_out = nullptr;
    ngx_chain_t        **last_buffered = &buffered_out;
    ngx_chain_t         *free_bufs = nullptr;
    ngx_chain_t         *busy_bufs = nullptr;
    // ngx.say/print output not yet passed to nginx's body filters
    // (glue::output says when it is).
    ngx_chain_t         *held = nullptr;
    ngx_chain_t         *held_tail = nullptr;
    size_t               held_bytes = 0;

    // body_filter_by_lua's view of the chain being filtered.
    ngx_chain_t         *filter_in = nullptr;
    ngx_chain_t         *filter_out = nullptr;
    bool                 filter_eof = false;
    bool                 filter_replaced = false;

    budget::Usage        usage;      // Lua time and memory, all phases

    LuaThread           *flush_waiter = nullptr; // in ngx.flush(true)
    // The arguments of the ngx.print/say flush_waiter makes once the
    // client took the pending output (lua_budget_output wait): a table
    // in the registry, released on resume or when the wait is cancelled.
    int                  print_ref = LUA_NOREF;
    bool                 print_newline = false;
    size_t               output_bytes = 0;  // of free_bufs and busy_bufs

    // ngx.req.read_body waiting for the client; ngx.req.init_body's
    // writer (api/req.cpp).
    LuaThread           *req_body_waiter = nullptr;
    bool                 req_body_done = false;
    // Opaque to the glue: api/req.cpp (bodyWriter/setBodyWriter) and
    // api/socket_tcp.cpp (reqSocket/setReqSocket) reach them, typed.
    void                *req_body_writer = nullptr;
    void                *req_socket = nullptr;     // ngx.req.socket's Tcp
    // Cosockets connected or connecting on this request's behalf
    // (lua_socket_max_per_request, api/socket_common.cpp).
    ngx_uint_t           sockets_held = 0;

    // ngx.on_abort's callback (registry ref) and whether the client's
    // early close was seen (ngx/subrequest.cpp).
    int                  on_abort_ref = LUA_NOREF;
    bool                 client_aborted = false;
};

// The innermost Lua run in progress: which request (null in init, timers
// without a request) and which phase. Kept as a stack because Lua can
// re-enter Lua through nginx (ngx.say -> header_filter_by_lua).
struct Run {
    RequestCtx  *ctx;
    Phase        phase;
    LuaThread   *thread;   // null for runs on the main state (pcall)
    Run         *prev;
};

extern Run *g_run;

class RunScope {
 public:
    RunScope(RequestCtx *ctx, Phase phase, LuaThread *thread = nullptr)
        : run_{ctx, phase, thread, g_run}
    {
        g_run = &run_;
    }
    ~RunScope() { g_run = run_.prev; }
    RunScope(const RunScope &) = delete;
    RunScope &operator=(const RunScope &) = delete;

 private:
    Run run_;
};

RequestCtx *getCtx(ngx_http_request_t *r);
// `vm`: the VM the request's Lua runs in; null: its location's.
RequestCtx *createCtx(ngx_http_request_t *r, Vm *vm = nullptr);
// The VM a location's code runs in.
Vm *vmOf(const LocConf *lcf);
// The RequestCtx a cleanup of a request pool holds, or null. Every
// location Lua ran in for a request left one there (internal redirects
// clear the module ctx, not the pool): the egress hook in
// ngx/subrequest.cpp walks them.
RequestCtx *ctxOfCleanup(const ngx_pool_cleanup_t *cln);
MainConf *mainConf();
// The cycle being configured (set before init_by_lua runs).
ngx_cycle_t *configCycle();
ngx_log_t *currentLog();

}  // namespace luaguard
