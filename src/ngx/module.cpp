// The module table, directives and configuration lifecycle.

#include <malloc.h>
#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cstring>
#include <new>
#include <string>

#include "api/api.hpp"
#include "ngx/module.hpp"
#include "ngx/balancer.hpp"
#include "ngx/capi.hpp"
#include "ngx/entry.hpp"
#include "ngx/tls.hpp"
#include "ngx/glue.hpp"
#include "ngx/metrics.hpp"
#include "ngx/pipe.hpp"
#include "ngx/subrequest.hpp"
#include "runtime/block_scanner.hpp"
#include "runtime/code.hpp"
#include "runtime/package_path.hpp"
#include "runtime/vm.hpp"
#include "security/egress.hpp"
#include "security/log_escape.hpp"
#include "security/script_path.hpp"
#include "shdict/zone.hpp"
#include "security/ngx_sandbox.hpp"

namespace luaguard {

Run *g_run = nullptr;

namespace {

MainConf *g_mcf = nullptr;
// The cycle whose configuration is being read, while init_by_lua may run
// (ngx_cycle is still the previous one, or a placeholder at first start).
ngx_cycle_t *g_conf_cycle = nullptr;

// How a code directive takes its code.
enum class Source { Inline, Block, File };

struct CodeDirective {
    const char *tag;      // chunk name prefix: "content_by_lua"
    Source      source;
};

#define LG_CODE_DIRECTIVE(var, tag, src) \
    CodeDirective var{tag, Source::src}

LG_CODE_DIRECTIVE(kInit, "init_by_lua", Inline);
LG_CODE_DIRECTIVE(kInitBlock, "init_by_lua", Block);
LG_CODE_DIRECTIVE(kInitFile, "init_by_lua", File);
LG_CODE_DIRECTIVE(kInitWorker, "init_worker_by_lua", Inline);
LG_CODE_DIRECTIVE(kInitWorkerBlock, "init_worker_by_lua", Block);
LG_CODE_DIRECTIVE(kInitWorkerFile, "init_worker_by_lua", File);
LG_CODE_DIRECTIVE(kExitWorker, "exit_worker_by_lua", Inline);
LG_CODE_DIRECTIVE(kExitWorkerBlock, "exit_worker_by_lua", Block);
LG_CODE_DIRECTIVE(kExitWorkerFile, "exit_worker_by_lua", File);
LG_CODE_DIRECTIVE(kServerRewrite, "server_rewrite_by_lua", Inline);
LG_CODE_DIRECTIVE(kServerRewriteBlock, "server_rewrite_by_lua", Block);
LG_CODE_DIRECTIVE(kServerRewriteFile, "server_rewrite_by_lua", File);
LG_CODE_DIRECTIVE(kRewrite, "rewrite_by_lua", Inline);
LG_CODE_DIRECTIVE(kRewriteBlock, "rewrite_by_lua", Block);
LG_CODE_DIRECTIVE(kRewriteFile, "rewrite_by_lua", File);
LG_CODE_DIRECTIVE(kAccess, "access_by_lua", Inline);
LG_CODE_DIRECTIVE(kAccessBlock, "access_by_lua", Block);
LG_CODE_DIRECTIVE(kAccessFile, "access_by_lua", File);
LG_CODE_DIRECTIVE(kContent, "content_by_lua", Inline);
LG_CODE_DIRECTIVE(kContentBlock, "content_by_lua", Block);
LG_CODE_DIRECTIVE(kContentFile, "content_by_lua", File);
LG_CODE_DIRECTIVE(kSslCertBlock, "ssl_certificate_by_lua", Block);
LG_CODE_DIRECTIVE(kSslCertFile, "ssl_certificate_by_lua", File);
LG_CODE_DIRECTIVE(kSslFetchBlock, "ssl_session_fetch_by_lua", Block);
LG_CODE_DIRECTIVE(kSslFetchFile, "ssl_session_fetch_by_lua", File);
LG_CODE_DIRECTIVE(kSslStoreBlock, "ssl_session_store_by_lua", Block);
LG_CODE_DIRECTIVE(kSslStoreFile, "ssl_session_store_by_lua", File);
LG_CODE_DIRECTIVE(kSslHelloBlock, "ssl_client_hello_by_lua", Block);
LG_CODE_DIRECTIVE(kSslHelloFile, "ssl_client_hello_by_lua", File);
LG_CODE_DIRECTIVE(kBalancerBlock, "balancer_by_lua", Block);
LG_CODE_DIRECTIVE(kBalancerFile, "balancer_by_lua", File);
LG_CODE_DIRECTIVE(kLog, "log_by_lua", Inline);
LG_CODE_DIRECTIVE(kLogBlock, "log_by_lua", Block);
LG_CODE_DIRECTIVE(kLogFile, "log_by_lua", File);
LG_CODE_DIRECTIVE(kHeaderFilter, "header_filter_by_lua", Inline);
LG_CODE_DIRECTIVE(kHeaderFilterBlock, "header_filter_by_lua", Block);
LG_CODE_DIRECTIVE(kHeaderFilterFile, "header_filter_by_lua", File);
LG_CODE_DIRECTIVE(kBodyFilter, "body_filter_by_lua", Inline);
LG_CODE_DIRECTIVE(kBodyFilterBlock, "body_filter_by_lua", Block);
LG_CODE_DIRECTIVE(kBodyFilterFile, "body_filter_by_lua", File);
LG_CODE_DIRECTIVE(kSet, "set_by_lua", Inline);
LG_CODE_DIRECTIVE(kSetBlock, "set_by_lua", Block);
LG_CODE_DIRECTIVE(kSetFile, "set_by_lua", File);

#undef LG_CODE_DIRECTIVE

void closeVm(void *data)
{
    delete static_cast<Vm *>(data);
}

// The error of a __gc finalizer, which LuaJIT drops instead of raising it
// in whatever code the collector's step ran in (another request's, a trace
// exit; scripts/luajit-patches/quiet-finalizer-errors.patch). Called with
// the error on top of L; raises nothing, allocates nothing in Lua. A
// worker thread's VM has no log to write to: its errors are only dropped.
void reportFinalizerError(lua_State *L)
{
    if (gettid() != getpid()) {
        return;
    }
    try {
        std::string text = "error in __gc finalizer: ";
        if (lua_type(L, -1) == LUA_TSTRING) {
            size_t len;
            const char *msg = lua_tolstring(L, -1, &len);
            appendLogEscaped(text, msg, len);
        } else {
            text += "(a ";
            text += lua_typename(L, lua_type(L, -1));
            text += " value)";
        }
        ngx_log_error(NGX_LOG_ERR, currentLog(), 0, "%s", text.c_str());
    } catch (const std::bad_alloc &) {
        // Out of memory in the process: the line is lost, the error too.
    }
}

// A started VM, owned by the cycle's pool: a reload builds new VMs with the
// new configuration and the old ones go with the old cycle.
Vm *openVm(ngx_conf_t *cf)
{
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == nullptr) {
        return nullptr;
    }

    auto *vm = new (std::nothrow) Vm();
    if (vm == nullptr) {
        return nullptr;
    }

    std::string err;
    if (!vm->open(&err) || !api::open(vm, &err)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "failed to start LuaJIT: %s",
                           err.c_str());
        delete vm;
        return nullptr;
    }

    // Every entry into Lua is protected (ngx/entry.hpp); an error that
    // still finds no handler is logged before LuaJIT ends the process.
    lua_atpanic(vm->L(), entry::panic);
    // The configuration is read on the main thread, whose stack the
    // workers inherit.
    vm->limitCStack();
#ifdef LUAGUARD_CHECKHOOK
    luaguard_gc_finalizer_error(reportFinalizerError);
#endif
    vm->memory().on_over = budget::Guard::memoryOver;

    cln->handler = closeVm;
    cln->data = vm;
    return vm;
}

// The default VM, started by the first Lua directive: inline code is
// compiled into it while the configuration is parsed.
Vm *ensureVm(ngx_conf_t *cf)
{
    auto *mcf = static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
    if (mcf->vm == nullptr) {
        mcf->vm = openVm(cf);
    }
    return mcf->vm;
}

ngx_str_t chunkName(ngx_conf_t *cf, const char *tag, ngx_uint_t line)
{
    ngx_str_t out = ngx_null_string;
    ngx_str_t *file = &cf->conf_file->file.name;
    u_char *base = file->data;

    for (u_char *p = file->data; p < file->data + file->len; p++) {
        if (*p == '/') {
            base = p + 1;
        }
    }
    size_t baselen = file->data + file->len - base;
    size_t len = std::strlen(tag) + baselen + NGX_INT_T_LEN + 4;

    out.data = static_cast<u_char *>(ngx_pnalloc(cf->pool, len + 1));
    if (out.data == nullptr) {
        return out;
    }
    u_char *last = ngx_snprintf(out.data, len, "=%s(%*s:%ui)", tag, baselen,
                                base, line);
    *last = '\0';
    out.len = last - out.data;
    return out;
}

// Reads the body of a `*_by_lua_block` straight from nginx's configuration
// buffer, refilling it from the file the way ngx_conf_read_token does, and
// leaves the buffer just past the closing brace.
char *readLuaBlock(ngx_conf_t *cf, ngx_str_t *code)
{
    ngx_conf_file_t *cfile = cf->conf_file;
    ngx_buf_t *b = cfile->buffer;
    BlockScanner scanner;
    std::string text;
    ngx_uint_t start_line = cfile->line;

    for (;;) {
        size_t used = 0;
        size_t avail = b->last - b->pos;
        auto st = scanner.feed(reinterpret_cast<const char *>(b->pos), avail,
                               &used);

        if (st == BlockScanner::Status::Done) {
            text.append(reinterpret_cast<const char *>(b->pos), used - 1);
            b->pos += used;
            break;
        }
        text.append(reinterpret_cast<const char *>(b->pos), avail);
        b->pos = b->last;

        if (cfile->file.fd == NGX_INVALID_FILE
            || cfile->file.offset >= ngx_file_size(&cfile->file.info))
        {
            cfile->line = start_line + scanner.lines();
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "unexpected end of file inside %s, "
                               "expecting \"}\" to close the Lua block",
                               scanner.context());
            return static_cast<char *>(NGX_CONF_ERROR);
        }

        ssize_t size = ngx_file_size(&cfile->file.info) - cfile->file.offset;
        if (size > b->end - b->start) {
            size = b->end - b->start;
        }
        ssize_t n = ngx_read_file(&cfile->file, b->start, size,
                                  cfile->file.offset);
        if (n == NGX_ERROR) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        if (n != size) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               ngx_read_file_n " returned only %z bytes "
                               "instead of %z", n, size);
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        b->pos = b->start;
        b->last = b->start + n;
        if (cfile->dump) {
            cfile->dump->last = ngx_cpymem(cfile->dump->last, b->pos, n);
        }
    }

    cfile->line = start_line + scanner.lines();

    code->len = text.size();
    code->data = static_cast<u_char *>(ngx_pnalloc(cf->pool, text.size() + 1));
    if (code->data == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    ngx_memcpy(code->data, text.data(), text.size());
    code->data[text.size()] = '\0';
    return NGX_CONF_OK;
}

// Compiles inline code now, so a syntax error fails `nginx -t` with the
// configuration file and the line of the error inside the block.
char *compileInline(ngx_conf_t *cf, Handler *h, ngx_uint_t first_line)
{
    Vm *vm = ensureVm(cf);
    if (vm == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    lua_State *L = vm->L();
    std::string err;

    if (isBytecode(reinterpret_cast<const char *>(h->code.data), h->code.len)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "Lua bytecode is not accepted in inline code");
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    if (!compileFactory(L, reinterpret_cast<const char *>(h->code.data),
                        h->code.len,
                        reinterpret_cast<const char *>(h->chunkname.data),
                        &err))
    {
        // Point nginx's "in FILE:LINE" at the offending line of the block.
        ngx_uint_t saved = cf->conf_file->line;
        size_t colon = err.find("):");
        if (colon != std::string::npos) {
            long lua_line = std::strtol(err.c_str() + colon + 2, nullptr, 10);
            if (lua_line > 0) {
                cf->conf_file->line = first_line + lua_line - 1;
            }
        }
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "failed to load Lua code: %s",
                           err.c_str());
        cf->conf_file->line = saved;
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    h->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return NGX_CONF_OK;
}

// Parses the code argument of any code directive into a Handler.
char *parseHandler(ngx_conf_t *cf, const CodeDirective *d, ngx_str_t *arg,
                   Handler **out)
{
    auto *h = static_cast<Handler *>(ngx_pcalloc(cf->pool, sizeof(Handler)));
    if (h == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    h->ref = LUA_NOREF;
    ngx_uint_t first_line = cf->conf_file->line;

    if (d->source == Source::File) {
        if (arg->len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid location config: "
                               "no Lua file path given");
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        h->path = static_cast<ngx_http_complex_value_t *>(
            ngx_pcalloc(cf->pool, sizeof(ngx_http_complex_value_t)));
        if (h->path == nullptr) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        ngx_http_compile_complex_value_t ccv{};
        ccv.cf = cf;
        ccv.value = arg;
        ccv.complex_value = h->path;
        if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        if (h->path->lengths == nullptr) {
            // A fixed path: resolve it against the prefix once.
            if (ngx_get_full_name(cf->pool, &cf->cycle->prefix,
                                  &h->path->value) != NGX_OK)
            {
                return static_cast<char *>(NGX_CONF_ERROR);
            }
        }
        if (ensureVm(cf) == nullptr) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        *out = h;
        return NGX_CONF_OK;
    }

    if (d->source == Source::Block) {
        char *rv = readLuaBlock(cf, &h->code);
        if (rv != NGX_CONF_OK) {
            return rv;
        }
    } else {
        h->code = *arg;
    }

    h->chunkname = chunkName(cf, d->tag, first_line);
    if (h->chunkname.data == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    ngx_uint_t code_line = first_line;
    if (d->source == Source::Inline) {
        // nginx has read the whole quoted string: the line is its last one.
        for (size_t i = 0; i < h->code.len; i++) {
            if (h->code.data[i] == '\n' && code_line > 1) {
                code_line--;
            }
        }
    }
    char *rv = compileInline(cf, h, code_line);
    if (rv != NGX_CONF_OK) {
        return rv;
    }
    *out = h;
    return NGX_CONF_OK;
}

// Generic setter: cmd->offset locates the Handler* in the conf struct,
// cmd->post describes the directive.
char *setHandler(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto *d = static_cast<const CodeDirective *>(cmd->post);
    auto **slot = reinterpret_cast<Handler **>(static_cast<char *>(conf)
                                               + cmd->offset);
    if (*slot != nullptr) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_str_t empty = ngx_null_string;
    ngx_str_t *arg = d->source == Source::Block ? &empty : &args[1];

    char *rv = parseHandler(cf, d, arg, slot);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    auto *mcf = static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
    std::string tag = d->tag;
    if (tag == "rewrite_by_lua") {
        mcf->need_rewrite = true;
    } else if (tag == "access_by_lua") {
        mcf->need_access = true;
    } else if (tag == "log_by_lua") {
        mcf->need_log = true;
    } else if (tag == "server_rewrite_by_lua") {
        mcf->need_server_rewrite = true;
    } else if (tag == "content_by_lua") {
        auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
            ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
        clcf->handler = entry::edge<glue::contentHandler>;
    }
    return NGX_CONF_OK;
}

// balancer_by_lua* in an upstream block: the code, then the wrapper
// around the block's balancer.
char *setBalancer(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto *srv = static_cast<SrvConf *>(conf);
    if (srv->balancer != nullptr) {
        return const_cast<char *>("is duplicate");
    }
    auto *d = static_cast<const CodeDirective *>(cmd->post);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_str_t empty = ngx_null_string;
    ngx_str_t *arg = d->source == Source::Block ? &empty : &args[1];
    char *rv = parseHandler(cf, d, arg, &srv->balancer);
    if (rv != NGX_CONF_OK) {
        return rv;
    }
    return balancer::install(cf, srv);
}

// set_by_lua* appends a step to the rewrite module's script, so it runs in
// order with `set`, `if` and `rewrite` in the same location. The rewrite
// module keeps its location configuration private; this is its layout in
// nginx 1.22, as every set_by_* module (NDK's included) relies on.
struct RewriteLocConf {
    ngx_array_t  *codes;
    ngx_uint_t    stack_size;
    ngx_flag_t    log;
    ngx_flag_t    uninitialized_variable_warn;
};

char *setByLua(ngx_conf_t *cf, ngx_command_t *cmd, void *)
{
    auto *d = static_cast<const CodeDirective *>(cmd->post);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_str_t target = args[1];

    if (target.len < 2 || target.data[0] != '$') {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid variable name \"%V\"",
                           &target);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    target.data++;
    target.len--;

    auto *step = static_cast<glue::SetStep *>(
        ngx_pcalloc(cf->pool, sizeof(glue::SetStep)));
    if (step == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }

    ngx_str_t empty = ngx_null_string;
    ngx_uint_t first_arg = d->source == Source::Block ? 2 : 3;
    ngx_str_t *code = d->source == Source::Block ? &empty : &args[2];
    char *rv = parseHandler(cf, d, code, &step->handler);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    // The $arg parameters, evaluated per request into ngx.arg.
    ngx_uint_t nargs = cf->args->nelts > first_arg ? cf->args->nelts - first_arg
                                                   : 0;
    if (nargs) {
        step->args = static_cast<ngx_http_complex_value_t *>(ngx_pcalloc(
            cf->pool, nargs * sizeof(ngx_http_complex_value_t)));
        if (step->args == nullptr) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        for (ngx_uint_t i = 0; i < nargs; i++) {
            ngx_http_compile_complex_value_t ccv{};
            ccv.cf = cf;
            ccv.value = &args[first_arg + i];
            ccv.complex_value = &step->args[i];
            if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
                return static_cast<char *>(NGX_CONF_ERROR);
            }
        }
    }
    step->nargs = nargs;
    step->target = target;

    ngx_http_variable_t *v = ngx_http_add_variable(cf, &target,
                                                   NGX_HTTP_VAR_CHANGEABLE);
    if (v == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    ngx_int_t index = ngx_http_get_variable_index(cf, &target);
    if (index == NGX_ERROR) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    if (v->get_handler == nullptr) {
        // Like `set`: reading before the first assignment yields "".
        v->get_handler = glue::emptyVariable;
    }

    auto *rlcf = static_cast<RewriteLocConf *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_rewrite_module));
    if (rlcf->codes == nullptr) {
        rlcf->codes = ngx_array_create(cf->pool, 64, 1);
        if (rlcf->codes == nullptr) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
    }

    auto *run = static_cast<glue::SetCode *>(
        ngx_array_push_n(rlcf->codes, sizeof(glue::SetCode)));
    if (run == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    run->code = entry::edge<glue::runSetStep>;
    run->step = step;

    if (v->set_handler) {
        auto *vhcode = static_cast<ngx_http_script_var_handler_code_t *>(
            ngx_array_push_n(rlcf->codes,
                             sizeof(ngx_http_script_var_handler_code_t)));
        if (vhcode == nullptr) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        vhcode->code = ngx_http_script_var_set_handler_code;
        vhcode->handler = v->set_handler;
        vhcode->data = v->data;
        return NGX_CONF_OK;
    }

    auto *vcode = static_cast<ngx_http_script_var_code_t *>(
        ngx_array_push_n(rlcf->codes, sizeof(ngx_http_script_var_code_t)));
    if (vcode == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    vcode->code = ngx_http_script_set_var_code;
    vcode->index = static_cast<uintptr_t>(index);
    return NGX_CONF_OK;
}

// "off" or a time ("1s", "250ms"): how long Lua may run.
// lua_code_cache: lua-nginx-module warns at every "off", and users look
// for that line.
char *setCodeCache(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char *rv = ngx_conf_set_flag_slot(cf, cmd, conf);
    auto *llcf = static_cast<LocConf *>(conf);
    if (rv == NGX_CONF_OK && llcf->code_cache == 0) {
        ngx_conf_log_error(NGX_LOG_ALERT, cf, 0,
                           "lua_code_cache is off; this will hurt "
                           "performance");
    }
    return rv;
}

char *setBudgetTime(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto *slot = reinterpret_cast<ngx_msec_t *>(static_cast<char *>(conf)
                                                + cmd->offset);
    if (*slot != NGX_CONF_UNSET_MSEC) {
        return const_cast<char *>("is duplicate");
    }
    ngx_str_t *v = &static_cast<ngx_str_t *>(cf->args->elts)[1];
    if (v->len == 3 && ngx_strncmp(v->data, "off", 3) == 0) {
        *slot = 0;
        return NGX_CONF_OK;
    }
    ngx_int_t ms = ngx_parse_time(v, 0);
    if (ms == NGX_ERROR || ms == 0) {
        return const_cast<char *>("invalid value: expected a time such as "
                                  "\"500ms\" or \"off\"");
    }
    *slot = static_cast<ngx_msec_t>(ms);
    return NGX_CONF_OK;
}

// "off" or a size ("256m").
char *setBudgetSize(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto *slot = reinterpret_cast<off_t *>(static_cast<char *>(conf)
                                           + cmd->offset);
    if (*slot != NGX_CONF_UNSET) {
        return const_cast<char *>("is duplicate");
    }
    ngx_str_t *v = &static_cast<ngx_str_t *>(cf->args->elts)[1];
    if (v->len == 3 && ngx_strncmp(v->data, "off", 3) == 0) {
        *slot = 0;
        return NGX_CONF_OK;
    }
    off_t size = ngx_parse_offset(v);
    if (size == NGX_ERROR || size < 1024 * 1024) {
        return const_cast<char *>("invalid value: expected a size of at "
                                  "least 1m, or \"off\"");
    }
    *slot = size;
    return NGX_CONF_OK;
}

// lua_timer_cpu_per_location: "off", or the Lua time a location's timer
// callbacks may use per interval ("250ms", "250ms 1s").
char *setTimerCpu(ngx_conf_t *cf, ngx_command_t *, void *conf)
{
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->timer_cpu != NGX_CONF_UNSET_MSEC) {
        return const_cast<char *>("is duplicate");
    }
    auto *v = static_cast<ngx_str_t *>(cf->args->elts);
    if (v[1].len == 3 && ngx_strncmp(v[1].data, "off", 3) == 0) {
        if (cf->args->nelts > 2) {
            return const_cast<char *>("takes no interval when \"off\"");
        }
        lcf->timer_cpu = 0;
        lcf->timer_cpu_interval = 1000;
        return NGX_CONF_OK;
    }
    ngx_int_t cpu = ngx_parse_time(&v[1], 0);
    ngx_int_t interval = cf->args->nelts > 2 ? ngx_parse_time(&v[2], 0)
                                             : 1000;
    if (cpu == NGX_ERROR || cpu == 0 || interval == NGX_ERROR
        || interval < cpu)
    {
        return const_cast<char *>("invalid value: expected a time such as "
                                  "\"250ms\", an optional interval not "
                                  "shorter than it, or \"off\"");
    }
    lcf->timer_cpu = static_cast<ngx_msec_t>(cpu);
    lcf->timer_cpu_interval = static_cast<ngx_msec_t>(interval);
    return NGX_CONF_OK;
}

char *setBudgetStatus(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto *slot = reinterpret_cast<ngx_uint_t *>(static_cast<char *>(conf)
                                                + cmd->offset);
    if (*slot != NGX_CONF_UNSET_UINT) {
        return const_cast<char *>("is duplicate");
    }
    ngx_str_t *v = &static_cast<ngx_str_t *>(cf->args->elts)[1];
    ngx_int_t n = ngx_atoi(v->data, v->len);
    if (n < 400 || n > 599) {
        return const_cast<char *>("invalid value: expected a status code "
                                  "from 400 to 599");
    }
    *slot = static_cast<ngx_uint_t>(n);
    return NGX_CONF_OK;
}

// Warns (nginx -t shows it) about search path entries anyone could plant
// a module in: relative ones (resolved against the worker's current
// directory) and ones under a world-writable directory.
void warnUnsafeSearchPath(ngx_conf_t *cf, const ngx_str_t &value)
{
    std::string all(reinterpret_cast<char *>(value.data), value.len);
    size_t start = 0;
    while (start <= all.size()) {
        size_t end = all.find(';', start);
        if (end == std::string::npos) {
            end = all.size();
        }
        std::string entry = all.substr(start, end - start);
        start = end + 1;
        if (entry.empty() || entry.compare(0, 7, "$prefix") == 0
            || entry.compare(0, 9, "${prefix}") == 0)
        {
            continue;
        }
        if (entry[0] != '/') {
            ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                               "\"%V\" entry \"%s\" is relative: modules "
                               "are then looked up in the worker's current "
                               "directory", &static_cast<ngx_str_t *>(
                                   cf->args->elts)[0], entry.c_str());
            continue;
        }
        std::string dir = entry.substr(0, entry.find('?'));
        dir = dir.substr(0, dir.rfind('/') + 1);
        struct stat st;
        while (dir.size() > 1) {
            if (stat(dir.c_str(), &st) == 0) {
                if ((st.st_mode & S_IWOTH) && !(st.st_mode & S_ISVTX)) {
                    ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                                       "\"%V\" entry \"%s\" is under the "
                                       "world-writable directory \"%s\"",
                                       &static_cast<ngx_str_t *>(
                                           cf->args->elts)[0],
                                       entry.c_str(), dir.c_str());
                }
                break;  // the closest existing directory decides
            }
            dir.pop_back();
            dir = dir.substr(0, dir.rfind('/') + 1);
        }
    }
}

void destroyEgressRule(void *data)
{
    static_cast<egress::Rule *>(data)->~Rule();
}

void destroyEgressPolicy(void *data)
{
    static_cast<egress::Policy *>(data)->~Policy();
}

// `lua_egress allow|deny TARGET... [port=LIST]`: one rule, in order.
char *setEgressRule(ngx_conf_t *cf, ngx_command_t *, void *conf)
{
    auto *lcf = static_cast<LocConf *>(conf);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    std::vector<std::string> words;
    for (ngx_uint_t i = 1; i < cf->args->nelts; i++) {
        words.emplace_back(reinterpret_cast<char *>(args[i].data),
                           args[i].len);
    }
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(cf->pool,
                                                   sizeof(egress::Rule));
    if (cln == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    auto *rule = new (cln->data) egress::Rule();
    cln->handler = destroyEgressRule;
    std::string err;
    if (!egress::parseRule(words, rule, &err)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "lua_egress: %s",
                           err.c_str());
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    if (lcf->egress_rules == nullptr) {
        lcf->egress_rules = ngx_array_create(cf->pool, 4,
                                             sizeof(egress::Rule *));
        if (lcf->egress_rules == nullptr) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
    }
    auto **slot = static_cast<egress::Rule **>(
        ngx_array_push(lcf->egress_rules));
    if (slot == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    *slot = rule;
    return NGX_CONF_OK;
}

// Rules are inherited as a whole, like nginx's allow/deny: a level with
// rules of its own does not see its parent's.
char *mergeEgress(ngx_conf_t *cf, LocConf *prev, LocConf *conf)
{
    if (conf->egress_rules == nullptr) {
        conf->egress_rules = prev->egress_rules;
    }
    ngx_conf_merge_value(conf->egress_default, prev->egress_default, 1);
    if (conf->egress_rules == nullptr && conf->egress_default) {
        conf->egress = nullptr;  // the built-in default: metadata refused
        return NGX_CONF_OK;
    }
    if (prev->egress && prev->egress_rules == conf->egress_rules
        && prev->egress_default == conf->egress_default)
    {
        // Inherited as a whole: the same object, so the policy identity
        // that keys cosocket pools (api/socket_tcp.cpp) is shared too.
        conf->egress = prev->egress;
        return NGX_CONF_OK;
    }
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(cf->pool,
                                                   sizeof(egress::Policy));
    if (cln == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    auto *p = new (cln->data) egress::Policy();
    cln->handler = destroyEgressPolicy;
    p->default_allow = conf->egress_default;
    if (conf->egress_rules) {
        auto **rules = static_cast<egress::Rule **>(conf->egress_rules->elts);
        for (ngx_uint_t i = 0; i < conf->egress_rules->nelts; i++) {
            p->rules.push_back(*rules[i]);
        }
    }
    conf->egress = p;
    return NGX_CONF_OK;
}

char *setPackagePath(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto *slot = reinterpret_cast<ngx_str_t *>(static_cast<char *>(conf)
                                               + cmd->offset);
    if (slot->data) {
        return const_cast<char *>("is duplicate");
    }
    *slot = static_cast<ngx_str_t *>(cf->args->elts)[1];
    warnUnsafeSearchPath(cf, *slot);
    return NGX_CONF_OK;
}

// lua_vm NAME [memory=SIZE]: the locations that name a VM run in it;
// "default" names the VM of every location that names none. A memory
// limit is given once per name (its ceiling, lua_vm_memory_limit's by
// default).
char *setVm(ngx_conf_t *cf, ngx_command_t *, void *conf)
{
    auto *lcf = static_cast<LocConf *>(conf);
    if (lcf->vm_slot != NGX_CONF_UNSET_PTR) {
        return const_cast<char *>("is duplicate");
    }
    auto *mcf = static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
    auto *v = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_str_t name = v[1];
    size_t memory = NGX_CONF_UNSET_SIZE;
    if (cf->args->nelts > 2) {
        static const char kMem[] = "memory=";
        ngx_str_t arg = v[2];
        if (arg.len <= sizeof(kMem) - 1
            || ngx_strncmp(arg.data, kMem, sizeof(kMem) - 1) != 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &arg);
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        arg.data += sizeof(kMem) - 1;
        arg.len -= sizeof(kMem) - 1;
        if (arg.len == 3 && ngx_strncmp(arg.data, "off", 3) == 0) {
            memory = 0;
        } else {
            ssize_t size = ngx_parse_size(&arg);
            if (size == NGX_ERROR || size < 1024 * 1024) {
                return const_cast<char *>("invalid memory: expected a size "
                                          "of at least 1m, or \"off\"");
            }
            memory = static_cast<size_t>(size);
        }
    }
    if (name.len == 7 && ngx_strncmp(name.data, "default", 7) == 0) {
        if (memory != NGX_CONF_UNSET_SIZE) {
            return const_cast<char *>("sets no memory for the default VM: "
                                      "use lua_vm_memory_limit");
        }
        lcf->vm_slot = nullptr;
        return NGX_CONF_OK;
    }
    for (u_char *p = name.data; p < name.data + name.len; p++) {
        if (!(std::isalnum(*p) || *p == '_' || *p == '-' || *p == '.')) {
            return const_cast<char *>("invalid name: letters, digits, "
                                      "\"_\", \"-\" and \".\" only");
        }
    }
    if (mcf->vms == nullptr) {
        mcf->vms = ngx_array_create(cf->pool, 4, sizeof(VmSlot *));
        if (mcf->vms == nullptr) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
    }
    auto **slots = static_cast<VmSlot **>(mcf->vms->elts);
    VmSlot *slot = nullptr;
    for (ngx_uint_t i = 0; i < mcf->vms->nelts; i++) {
        if (slots[i]->name.len == name.len
            && ngx_strncmp(slots[i]->name.data, name.data, name.len) == 0)
        {
            slot = slots[i];
        }
    }
    if (slot == nullptr) {
        slot = static_cast<VmSlot *>(ngx_pcalloc(cf->pool, sizeof(VmSlot)));
        auto **at = static_cast<VmSlot **>(ngx_array_push(mcf->vms));
        if (slot == nullptr || at == nullptr) {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        slot->name = name;
        slot->memory_limit = NGX_CONF_UNSET_SIZE;
        *at = slot;
    }
    if (memory != NGX_CONF_UNSET_SIZE) {
        if (slot->memory_limit != NGX_CONF_UNSET_SIZE
            && slot->memory_limit != memory)
        {
            return const_cast<char *>("gives this VM a second memory "
                                      "limit");
        }
        slot->memory_limit = memory;
    }
    lcf->vm_slot = slot;
    return NGX_CONF_OK;
}

// lua_load_resty_core: lua-nginx-module accepts and ignores it since
// 0.10.16, with this warning; luaguard's resty.core modules are built in.
char *ignoreLoadRestyCore(ngx_conf_t *cf, ngx_command_t *, void *)
{
    ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                       "lua_load_resty_core is deprecated (the "
                       "lua-resty-core library is required since ngx_lua "
                       "v0.10.16)");
    return NGX_CONF_OK;
}

// A number, with lua-nginx-module's message for anything else.
char *setMallocTrim(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto *field = reinterpret_cast<ngx_uint_t *>(static_cast<char *>(conf)
                                                 + cmd->offset);
    if (*field != NGX_CONF_UNSET_UINT) {
        return const_cast<char *>("is duplicate");
    }
    auto *value = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_int_t n = ngx_atoi(value[1].data, value[1].len);
    if (n == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" directive invalid number in the 1st "
                           "argument", &cmd->name);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    *field = static_cast<ngx_uint_t>(n);
    return NGX_CONF_OK;
}

#define LG_MAIN_OFF(field) offsetof(MainConf, field)
#define LG_SRV_OFF(field) offsetof(SrvConf, field)
#define LG_LOC_OFF(field) offsetof(LocConf, field)
#define LG_CMD(name, type, set, conf, off, post) \
    {ngx_string(name), type, entry::edge<set>, conf, off, post}

ngx_conf_num_bounds_t kAtLeastOne = {ngx_conf_check_num_bounds, 1, -1};

ngx_conf_enum_t kEgressDefaultEnum[] = {
    {ngx_string("allow"), 1},
    {ngx_string("deny"), 0},
    {ngx_null_string, 0}};

// lua_budget_output: 1 waits for the client, 0 stops the request.
ngx_conf_enum_t kBudgetOutputEnum[] = {
    {ngx_string("wait"), 1},
    {ngx_string("error"), 0},
    {ngx_null_string, 0}};

ngx_conf_enum_t kWritableEnum[] = {
    {ngx_string("off"), static_cast<ngx_uint_t>(script::Writable::Off)},
    {ngx_string("world"), static_cast<ngx_uint_t>(script::Writable::World)},
    {ngx_string("group"), static_cast<ngx_uint_t>(script::Writable::Group)},
    {ngx_null_string, 0}};

constexpr ngx_uint_t kMain = NGX_HTTP_MAIN_CONF;
constexpr ngx_uint_t kAnyLoc = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF
                               | NGX_HTTP_LOC_CONF;
constexpr ngx_uint_t kPhaseLoc = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF
                                 | NGX_HTTP_LOC_CONF | NGX_HTTP_LIF_CONF;
constexpr ngx_uint_t kContentLoc = NGX_HTTP_LOC_CONF | NGX_HTTP_LIF_CONF;
constexpr ngx_uint_t kBlock = NGX_CONF_BLOCK | NGX_CONF_NOARGS;
constexpr ngx_uint_t kMainLoc = NGX_HTTP_MAIN_CONF_OFFSET;
constexpr ngx_uint_t kSrvLoc = NGX_HTTP_SRV_CONF_OFFSET;
constexpr ngx_uint_t kLocLoc = NGX_HTTP_LOC_CONF_OFFSET;

// lua_ssl_protocols' values (nginx's ssl_protocols names).
ngx_conf_bitmask_t kSslProtocols[] = {
    {ngx_string("SSLv2"), NGX_SSL_SSLv2},
    {ngx_string("SSLv3"), NGX_SSL_SSLv3},
    {ngx_string("TLSv1"), NGX_SSL_TLSv1},
    {ngx_string("TLSv1.1"), NGX_SSL_TLSv1_1},
    {ngx_string("TLSv1.2"), NGX_SSL_TLSv1_2},
    {ngx_string("TLSv1.3"), NGX_SSL_TLSv1_3},
    {ngx_null_string, 0}};

ngx_command_t commands[] = {
    LG_CMD("lua_package_path", kMain | NGX_CONF_TAKE1, setPackagePath,
           kMainLoc, LG_MAIN_OFF(package_path), nullptr),
    LG_CMD("lua_package_cpath", kMain | NGX_CONF_TAKE1, setPackagePath,
           kMainLoc, LG_MAIN_OFF(package_cpath), nullptr),
    LG_CMD("rewrite_by_lua_no_postpone", kMain | NGX_CONF_FLAG,
           ngx_conf_set_flag_slot, kMainLoc, LG_MAIN_OFF(rewrite_no_postpone),
           nullptr),
    LG_CMD("access_by_lua_no_postpone", kMain | NGX_CONF_FLAG,
           ngx_conf_set_flag_slot, kMainLoc, LG_MAIN_OFF(access_no_postpone),
           nullptr),
    LG_CMD("lua_regex_cache_max_entries", kMain | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kMainLoc,
           LG_MAIN_OFF(regex_cache_max_entries), nullptr),
    LG_CMD("lua_regex_match_limit", kMain | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kMainLoc, LG_MAIN_OFF(regex_match_limit),
           nullptr),
    LG_CMD("lua_worker_thread_vm_pool_size", kMain | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kMainLoc,
           LG_MAIN_OFF(worker_thread_vm_pool_size), nullptr),

    LG_CMD("lua_capture_error_log", kMain | NGX_CONF_TAKE1,
           ngx_conf_set_size_slot, kMainLoc, LG_MAIN_OFF(capture_error_log),
           nullptr),
    LG_CMD("lua_malloc_trim", kMain | NGX_CONF_TAKE1, setMallocTrim,
           kMainLoc, LG_MAIN_OFF(malloc_trim), nullptr),
    LG_CMD("lua_sa_restart", kMain | NGX_CONF_FLAG, ngx_conf_set_flag_slot,
           kMainLoc, LG_MAIN_OFF(sa_restart), nullptr),
    LG_CMD("lua_thread_cache_max_entries", kMain | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kMainLoc,
           LG_MAIN_OFF(thread_cache_max_entries), nullptr),
    LG_CMD("lua_load_resty_core", kMain | NGX_CONF_FLAG, ignoreLoadRestyCore,
           kMainLoc, 0, nullptr),

    LG_CMD("lua_shared_dict", kMain | NGX_CONF_TAKE2,
           shdict::sharedDictDirective, kMainLoc, 0, nullptr),
    LG_CMD("lua_metrics", NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
           metrics::directive, kLocLoc, 0, nullptr),

    LG_CMD("init_by_lua", kMain | NGX_CONF_TAKE1, setHandler, kMainLoc,
           LG_MAIN_OFF(init), &kInit),
    LG_CMD("init_by_lua_block", kMain | kBlock, setHandler, kMainLoc,
           LG_MAIN_OFF(init), &kInitBlock),
    LG_CMD("init_by_lua_file", kMain | NGX_CONF_TAKE1, setHandler, kMainLoc,
           LG_MAIN_OFF(init), &kInitFile),
    LG_CMD("init_worker_by_lua", kMain | NGX_CONF_TAKE1, setHandler, kMainLoc,
           LG_MAIN_OFF(init_worker), &kInitWorker),
    LG_CMD("init_worker_by_lua_block", kMain | kBlock, setHandler, kMainLoc,
           LG_MAIN_OFF(init_worker), &kInitWorkerBlock),
    LG_CMD("init_worker_by_lua_file", kMain | NGX_CONF_TAKE1, setHandler,
           kMainLoc, LG_MAIN_OFF(init_worker), &kInitWorkerFile),
    LG_CMD("exit_worker_by_lua", kMain | NGX_CONF_TAKE1, setHandler, kMainLoc,
           LG_MAIN_OFF(exit_worker), &kExitWorker),
    LG_CMD("exit_worker_by_lua_block", kMain | kBlock, setHandler, kMainLoc,
           LG_MAIN_OFF(exit_worker), &kExitWorkerBlock),
    LG_CMD("exit_worker_by_lua_file", kMain | NGX_CONF_TAKE1, setHandler,
           kMainLoc, LG_MAIN_OFF(exit_worker), &kExitWorkerFile),

    LG_CMD("server_rewrite_by_lua", NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF
           | NGX_CONF_TAKE1, setHandler, kSrvLoc, LG_SRV_OFF(server_rewrite),
           &kServerRewrite),
    LG_CMD("server_rewrite_by_lua_block", NGX_HTTP_MAIN_CONF
           | NGX_HTTP_SRV_CONF | kBlock, setHandler, kSrvLoc,
           LG_SRV_OFF(server_rewrite), &kServerRewriteBlock),
    LG_CMD("server_rewrite_by_lua_file", NGX_HTTP_MAIN_CONF
           | NGX_HTTP_SRV_CONF | NGX_CONF_TAKE1, setHandler, kSrvLoc,
           LG_SRV_OFF(server_rewrite), &kServerRewriteFile),

    LG_CMD("rewrite_by_lua", kPhaseLoc | NGX_CONF_TAKE1, setHandler, kLocLoc,
           LG_LOC_OFF(rewrite), &kRewrite),
    LG_CMD("rewrite_by_lua_block", kPhaseLoc | kBlock, setHandler, kLocLoc,
           LG_LOC_OFF(rewrite), &kRewriteBlock),
    LG_CMD("rewrite_by_lua_file", kPhaseLoc | NGX_CONF_TAKE1, setHandler,
           kLocLoc, LG_LOC_OFF(rewrite), &kRewriteFile),
    LG_CMD("access_by_lua", kPhaseLoc | NGX_CONF_TAKE1, setHandler, kLocLoc,
           LG_LOC_OFF(access), &kAccess),
    LG_CMD("access_by_lua_block", kPhaseLoc | kBlock, setHandler, kLocLoc,
           LG_LOC_OFF(access), &kAccessBlock),
    LG_CMD("access_by_lua_file", kPhaseLoc | NGX_CONF_TAKE1, setHandler,
           kLocLoc, LG_LOC_OFF(access), &kAccessFile),
    LG_CMD("content_by_lua", kContentLoc | NGX_CONF_TAKE1, setHandler,
           kLocLoc, LG_LOC_OFF(content), &kContent),
    LG_CMD("content_by_lua_block", kContentLoc | kBlock, setHandler, kLocLoc,
           LG_LOC_OFF(content), &kContentBlock),
    LG_CMD("content_by_lua_file", kContentLoc | NGX_CONF_TAKE1, setHandler,
           kLocLoc, LG_LOC_OFF(content), &kContentFile),
    LG_CMD("ssl_certificate_by_lua_block",
           NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | kBlock, setHandler,
           kSrvLoc, LG_SRV_OFF(ssl_cert), &kSslCertBlock),
    LG_CMD("ssl_certificate_by_lua_file",
           NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_CONF_TAKE1, setHandler,
           kSrvLoc, LG_SRV_OFF(ssl_cert), &kSslCertFile),
    // The session cache is the http block's: lua-nginx-module allows the
    // fetch/store code there only.
    LG_CMD("ssl_session_fetch_by_lua_block", NGX_HTTP_MAIN_CONF | kBlock,
           setHandler, kMainLoc, LG_MAIN_OFF(ssl_sess_fetch),
           &kSslFetchBlock),
    LG_CMD("ssl_session_fetch_by_lua_file",
           NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, setHandler, kMainLoc,
           LG_MAIN_OFF(ssl_sess_fetch), &kSslFetchFile),
    LG_CMD("ssl_session_store_by_lua_block", NGX_HTTP_MAIN_CONF | kBlock,
           setHandler, kMainLoc, LG_MAIN_OFF(ssl_sess_store),
           &kSslStoreBlock),
    LG_CMD("ssl_session_store_by_lua_file",
           NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, setHandler, kMainLoc,
           LG_MAIN_OFF(ssl_sess_store), &kSslStoreFile),
    LG_CMD("ssl_client_hello_by_lua_block",
           NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | kBlock, setHandler,
           kSrvLoc, LG_SRV_OFF(ssl_client_hello), &kSslHelloBlock),
    LG_CMD("ssl_client_hello_by_lua_file",
           NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_CONF_TAKE1, setHandler,
           kSrvLoc, LG_SRV_OFF(ssl_client_hello), &kSslHelloFile),
    LG_CMD("balancer_by_lua_block", NGX_HTTP_UPS_CONF | kBlock, setBalancer,
           kSrvLoc, 0, &kBalancerBlock),
    LG_CMD("balancer_by_lua_file", NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1,
           setBalancer, kSrvLoc, 0, &kBalancerFile),
    LG_CMD("log_by_lua", kPhaseLoc | NGX_CONF_TAKE1, setHandler, kLocLoc,
           LG_LOC_OFF(log), &kLog),
    LG_CMD("log_by_lua_block", kPhaseLoc | kBlock, setHandler, kLocLoc,
           LG_LOC_OFF(log), &kLogBlock),
    LG_CMD("log_by_lua_file", kPhaseLoc | NGX_CONF_TAKE1, setHandler, kLocLoc,
           LG_LOC_OFF(log), &kLogFile),
    LG_CMD("header_filter_by_lua", kPhaseLoc | NGX_CONF_TAKE1, setHandler,
           kLocLoc, LG_LOC_OFF(header_filter), &kHeaderFilter),
    LG_CMD("header_filter_by_lua_block", kPhaseLoc | kBlock, setHandler,
           kLocLoc, LG_LOC_OFF(header_filter), &kHeaderFilterBlock),
    LG_CMD("header_filter_by_lua_file", kPhaseLoc | NGX_CONF_TAKE1,
           setHandler, kLocLoc, LG_LOC_OFF(header_filter),
           &kHeaderFilterFile),
    LG_CMD("body_filter_by_lua", kPhaseLoc | NGX_CONF_TAKE1, setHandler,
           kLocLoc, LG_LOC_OFF(body_filter), &kBodyFilter),
    LG_CMD("body_filter_by_lua_block", kPhaseLoc | kBlock, setHandler,
           kLocLoc, LG_LOC_OFF(body_filter), &kBodyFilterBlock),
    LG_CMD("body_filter_by_lua_file", kPhaseLoc | NGX_CONF_TAKE1, setHandler,
           kLocLoc, LG_LOC_OFF(body_filter), &kBodyFilterFile),

    LG_CMD("set_by_lua", NGX_HTTP_SRV_CONF | NGX_HTTP_SIF_CONF
           | NGX_HTTP_LOC_CONF | NGX_HTTP_LIF_CONF | NGX_CONF_2MORE,
           setByLua, kLocLoc, 0, &kSet),
    LG_CMD("set_by_lua_block", NGX_HTTP_SRV_CONF | NGX_HTTP_SIF_CONF
           | NGX_HTTP_LOC_CONF | NGX_HTTP_LIF_CONF | NGX_CONF_BLOCK
           | NGX_CONF_TAKE1, setByLua, kLocLoc, 0, &kSetBlock),
    LG_CMD("set_by_lua_file", NGX_HTTP_SRV_CONF | NGX_HTTP_SIF_CONF
           | NGX_HTTP_LOC_CONF | NGX_HTTP_LIF_CONF | NGX_CONF_2MORE,
           setByLua, kLocLoc, 0, &kSetFile),

    LG_CMD("lua_code_cache", kAnyLoc | NGX_CONF_FLAG, setCodeCache,
           kLocLoc, LG_LOC_OFF(code_cache), nullptr),
    LG_CMD("lua_need_request_body", kAnyLoc | NGX_CONF_FLAG,
           ngx_conf_set_flag_slot, kLocLoc, LG_LOC_OFF(need_request_body),
           nullptr),
    LG_CMD("lua_use_default_type", kAnyLoc | NGX_CONF_FLAG,
           ngx_conf_set_flag_slot, kLocLoc, LG_LOC_OFF(use_default_type),
           nullptr),
    LG_CMD("lua_transform_underscores_in_response_headers",
           kAnyLoc | NGX_CONF_FLAG, ngx_conf_set_flag_slot, kLocLoc,
           LG_LOC_OFF(transform_underscores), nullptr),
    LG_CMD("lua_http10_buffering", kAnyLoc | NGX_CONF_FLAG,
           ngx_conf_set_flag_slot, kLocLoc, LG_LOC_OFF(http10_buffering),
           nullptr),
    LG_CMD("lua_check_client_abort", kAnyLoc | NGX_CONF_FLAG,
           ngx_conf_set_flag_slot, kLocLoc, LG_LOC_OFF(check_client_abort),
           nullptr),
    LG_CMD("lua_sandbox", kAnyLoc | NGX_CONF_1MORE, sandbox::setDirective,
           kLocLoc, LG_LOC_OFF(sandbox), nullptr),
    LG_CMD("lua_vm", kAnyLoc | NGX_CONF_TAKE12, setVm, kLocLoc, 0, nullptr),
    LG_CMD("lua_pipe_limits", kAnyLoc | NGX_CONF_1MORE, pipe::setLimits,
           kLocLoc, LG_LOC_OFF(pipe_limits), nullptr),

    LG_CMD("lua_egress", kAnyLoc | NGX_CONF_2MORE, setEgressRule, kLocLoc, 0,
           nullptr),
    LG_CMD("lua_egress_default", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_enum_slot, kLocLoc, LG_LOC_OFF(egress_default),
           kEgressDefaultEnum),
    LG_CMD("lua_file_root", kAnyLoc | NGX_CONF_TAKE1, ngx_conf_set_str_slot,
           kLocLoc, LG_LOC_OFF(file_root), nullptr),
    LG_CMD("lua_file_check_writable", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_enum_slot, kLocLoc, LG_LOC_OFF(file_writable),
           kWritableEnum),
    LG_CMD("lua_file_owners", kAnyLoc | NGX_CONF_1MORE,
           ngx_conf_set_str_array_slot, kLocLoc, LG_LOC_OFF(file_owners),
           nullptr),
    LG_CMD("lua_budget_slice", kAnyLoc | NGX_CONF_TAKE1, setBudgetTime,
           kLocLoc, LG_LOC_OFF(budget_slice), nullptr),
    LG_CMD("lua_budget_request", kAnyLoc | NGX_CONF_TAKE1, setBudgetTime,
           kLocLoc, LG_LOC_OFF(budget_request), nullptr),
    LG_CMD("lua_budget_timer_slice", kAnyLoc | NGX_CONF_TAKE1, setBudgetTime,
           kLocLoc, LG_LOC_OFF(budget_timer_slice), nullptr),
    LG_CMD("lua_budget_timer", kAnyLoc | NGX_CONF_TAKE1, setBudgetTime,
           kLocLoc, LG_LOC_OFF(budget_timer), nullptr),
    LG_CMD("lua_budget_memory", kAnyLoc | NGX_CONF_TAKE1, setBudgetSize,
           kLocLoc, LG_LOC_OFF(budget_memory), nullptr),
    LG_CMD("lua_budget_status", kAnyLoc | NGX_CONF_TAKE1, setBudgetStatus,
           kLocLoc, LG_LOC_OFF(budget_status), nullptr),
    LG_CMD("lua_budget_output", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_enum_slot, kLocLoc, LG_LOC_OFF(budget_output_wait),
           kBudgetOutputEnum),
    LG_CMD("lua_max_pending_timers", kMain | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kMainLoc, LG_MAIN_OFF(max_pending_timers),
           nullptr),
    LG_CMD("lua_max_running_timers", kMain | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kMainLoc, LG_MAIN_OFF(max_running_timers),
           nullptr),
    LG_CMD("lua_max_pending_timers_per_location", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kLocLoc, LG_LOC_OFF(timer_max_pending),
           &kAtLeastOne),
    LG_CMD("lua_timer_memory_per_location", kAnyLoc | NGX_CONF_TAKE1,
           setBudgetSize, kLocLoc, LG_LOC_OFF(timer_max_memory), nullptr),
    LG_CMD("lua_timer_cpu_per_location", kAnyLoc | NGX_CONF_TAKE12,
           setTimerCpu, kLocLoc, 0, nullptr),
    LG_CMD("lua_vm_memory_limit", kMain | NGX_CONF_TAKE1, setBudgetSize,
           kMainLoc, LG_MAIN_OFF(vm_memory_limit), nullptr),
    LG_CMD("lua_watchdog_grace", kMain | NGX_CONF_TAKE1, setBudgetTime,
           kMainLoc, LG_MAIN_OFF(watchdog_grace), nullptr),

    LG_CMD("lua_socket_connect_timeout", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_msec_slot, kLocLoc,
           LG_LOC_OFF(socket_connect_timeout), nullptr),
    LG_CMD("lua_socket_send_timeout", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_msec_slot, kLocLoc, LG_LOC_OFF(socket_send_timeout),
           nullptr),
    LG_CMD("lua_socket_read_timeout", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_msec_slot, kLocLoc, LG_LOC_OFF(socket_read_timeout),
           nullptr),
    LG_CMD("lua_socket_keepalive_timeout", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_msec_slot, kLocLoc,
           LG_LOC_OFF(socket_keepalive_timeout), nullptr),
    LG_CMD("lua_socket_buffer_size", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_size_slot, kLocLoc, LG_LOC_OFF(socket_buffer_size),
           nullptr),
    LG_CMD("lua_socket_send_lowat", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_size_slot, kLocLoc, LG_LOC_OFF(socket_send_lowat),
           nullptr),
    LG_CMD("lua_socket_pool_size", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kLocLoc, LG_LOC_OFF(socket_pool_size),
           nullptr),
    LG_CMD("lua_socket_max_per_request", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kLocLoc,
           LG_LOC_OFF(socket_max_per_request), &kAtLeastOne),
    LG_CMD("lua_socket_log_errors", kAnyLoc | NGX_CONF_FLAG,
           ngx_conf_set_flag_slot, kLocLoc, LG_LOC_OFF(socket_log_errors),
           nullptr),
    LG_CMD("lua_ssl_trusted_certificate", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_str_slot, kLocLoc,
           LG_LOC_OFF(ssl_trusted_certificate), nullptr),
    LG_CMD("lua_ssl_verify_depth", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_num_slot, kLocLoc, LG_LOC_OFF(ssl_verify_depth),
           nullptr),
    LG_CMD("lua_ssl_protocols", kAnyLoc | NGX_CONF_1MORE,
           ngx_conf_set_bitmask_slot, kLocLoc, LG_LOC_OFF(ssl_protocols),
           kSslProtocols),
    LG_CMD("lua_ssl_ciphers", kAnyLoc | NGX_CONF_TAKE1,
           ngx_conf_set_str_slot, kLocLoc, LG_LOC_OFF(ssl_ciphers), nullptr),
    LG_CMD("lua_ssl_crl", kAnyLoc | NGX_CONF_TAKE1, ngx_conf_set_str_slot,
           kLocLoc, LG_LOC_OFF(ssl_crl), nullptr),
    LG_CMD("lua_ssl_conf_command", kAnyLoc | NGX_CONF_TAKE2,
           ngx_conf_set_keyval_slot, kLocLoc, LG_LOC_OFF(ssl_conf_commands),
           nullptr),

    ngx_null_command};

#undef LG_CMD

void *createMainConf(ngx_conf_t *cf)
{
    auto *mcf = static_cast<MainConf *>(ngx_pcalloc(cf->pool,
                                                    sizeof(MainConf)));
    if (mcf == nullptr) {
        return nullptr;
    }
    mcf->rewrite_no_postpone = NGX_CONF_UNSET;
    mcf->access_no_postpone = NGX_CONF_UNSET;
    mcf->vm_memory_limit = NGX_CONF_UNSET_SIZE;
    mcf->max_pending_timers = NGX_CONF_UNSET_UINT;
    mcf->max_running_timers = NGX_CONF_UNSET_UINT;
    mcf->watchdog_grace = NGX_CONF_UNSET_MSEC;
    // Left unset: the regex API applies its defaults (api/regex.cpp).
    mcf->regex_cache_max_entries = NGX_CONF_UNSET;
    mcf->regex_match_limit = NGX_CONF_UNSET;
    mcf->worker_thread_vm_pool_size = NGX_CONF_UNSET;
    mcf->capture_error_log = NGX_CONF_UNSET_SIZE;
    mcf->malloc_trim = NGX_CONF_UNSET_UINT;
    mcf->sa_restart = NGX_CONF_UNSET;
    mcf->thread_cache_max_entries = NGX_CONF_UNSET_UINT;
    return mcf;
}

char *initMainConf(ngx_conf_t *, void *conf)
{
    auto *mcf = static_cast<MainConf *>(conf);
    ngx_conf_init_value(mcf->rewrite_no_postpone, 0);
    ngx_conf_init_value(mcf->access_no_postpone, 0);
    // Defaults: see docs/budgets.md for why these numbers.
    ngx_conf_init_size_value(mcf->vm_memory_limit, 1024 * 1024 * 1024);
    ngx_conf_init_msec_value(mcf->watchdog_grace, 5000);
    ngx_conf_init_uint_value(mcf->max_pending_timers, 1024);
    ngx_conf_init_uint_value(mcf->max_running_timers, 256);
    ngx_conf_init_value(mcf->worker_thread_vm_pool_size, 10);
    // lua-nginx-module's defaults.
    ngx_conf_init_size_value(mcf->capture_error_log, 0);
    ngx_conf_init_uint_value(mcf->malloc_trim, 1000);
    ngx_conf_init_value(mcf->sa_restart, 1);
    ngx_conf_init_uint_value(mcf->thread_cache_max_entries, 1024);
    return NGX_CONF_OK;
}

void *createSrvConf(ngx_conf_t *cf)
{
    return ngx_pcalloc(cf->pool, sizeof(SrvConf));
}

char *mergeSrvConf(ngx_conf_t *cf, void *parent, void *child)
{
    auto *prev = static_cast<SrvConf *>(parent);
    auto *conf = static_cast<SrvConf *>(child);
    if (conf->server_rewrite == nullptr) {
        conf->server_rewrite = prev->server_rewrite;
    }
    if (conf->ssl_cert == nullptr) {
        conf->ssl_cert = prev->ssl_cert;
    }
    if (conf->ssl_client_hello == nullptr) {
        conf->ssl_client_hello = prev->ssl_client_hello;
    }
    if (!tls::installHooks(cf, conf)) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    return NGX_CONF_OK;
}

void *createLocConf(ngx_conf_t *cf)
{
    auto *conf = static_cast<LocConf *>(ngx_pcalloc(cf->pool,
                                                    sizeof(LocConf)));
    if (conf == nullptr) {
        return nullptr;
    }
    conf->code_cache = NGX_CONF_UNSET;
    conf->need_request_body = NGX_CONF_UNSET;
    conf->use_default_type = NGX_CONF_UNSET;
    conf->transform_underscores = NGX_CONF_UNSET;
    conf->http10_buffering = NGX_CONF_UNSET;
    conf->check_client_abort = NGX_CONF_UNSET;
    conf->egress_default = NGX_CONF_UNSET;
    conf->file_writable = NGX_CONF_UNSET_UINT;
    conf->file_owners = static_cast<ngx_array_t *>(NGX_CONF_UNSET_PTR);
    conf->budget_slice = NGX_CONF_UNSET_MSEC;
    conf->budget_request = NGX_CONF_UNSET_MSEC;
    conf->budget_memory = NGX_CONF_UNSET;
    conf->budget_status = NGX_CONF_UNSET_UINT;
    conf->budget_output_wait = NGX_CONF_UNSET_UINT;
    conf->budget_timer_slice = NGX_CONF_UNSET_MSEC;
    conf->budget_timer = NGX_CONF_UNSET_MSEC;
    conf->timer_max_pending = NGX_CONF_UNSET_UINT;
    conf->timer_max_memory = NGX_CONF_UNSET;
    conf->timer_cpu = NGX_CONF_UNSET_MSEC;
    conf->timer_cpu_interval = NGX_CONF_UNSET_MSEC;
    conf->socket_connect_timeout = NGX_CONF_UNSET_MSEC;
    conf->socket_send_timeout = NGX_CONF_UNSET_MSEC;
    conf->socket_read_timeout = NGX_CONF_UNSET_MSEC;
    conf->socket_keepalive_timeout = NGX_CONF_UNSET_MSEC;
    conf->socket_buffer_size = NGX_CONF_UNSET_SIZE;
    conf->socket_send_lowat = NGX_CONF_UNSET_SIZE;
    conf->socket_pool_size = NGX_CONF_UNSET_UINT;
    conf->socket_max_per_request = NGX_CONF_UNSET_UINT;
    conf->socket_log_errors = NGX_CONF_UNSET;
    conf->ssl_verify_depth = NGX_CONF_UNSET;
    conf->ssl_conf_commands = static_cast<ngx_array_t *>(NGX_CONF_UNSET_PTR);
    conf->vm_slot = static_cast<VmSlot *>(NGX_CONF_UNSET_PTR);
    return conf;
}

void destroyScriptPolicy(void *data)
{
    static_cast<script::Policy *>(data)->~Policy();
}

// The *_by_lua_file policy of a location, as a C++ object the loader uses.
char *mergeScriptPolicy(ngx_conf_t *cf, LocConf *prev, LocConf *conf)
{
    ngx_conf_merge_str_value(conf->file_root, prev->file_root, "");
    ngx_conf_merge_uint_value(conf->file_writable, prev->file_writable,
                              static_cast<ngx_uint_t>(script::Writable::World));
    ngx_conf_merge_ptr_value(conf->file_owners, prev->file_owners, nullptr);

    ngx_str_t root = conf->file_root;
    if (root.len == 0) {
        root = cf->cycle->prefix;
    } else if (ngx_get_full_name(cf->pool, &cf->cycle->prefix, &root)
               != NGX_OK)
    {
        return static_cast<char *>(NGX_CONF_ERROR);
    }

    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(cf->pool,
                                                   sizeof(script::Policy));
    if (cln == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    auto *p = new (cln->data) script::Policy();
    cln->handler = destroyScriptPolicy;
    p->root.assign(reinterpret_cast<char *>(root.data), root.len);
    while (p->root.size() > 1 && p->root.back() == '/') {
        p->root.pop_back();
    }
    p->writable = static_cast<script::Writable>(conf->file_writable);
    if (conf->file_owners) {
        auto *names = static_cast<ngx_str_t *>(conf->file_owners->elts);
        for (ngx_uint_t i = 0; i < conf->file_owners->nelts; i++) {
            std::string name(reinterpret_cast<char *>(names[i].data),
                             names[i].len);
            struct passwd *pw = getpwnam(name.c_str());
            if (pw == nullptr) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "lua_file_owners: unknown user \"%V\"",
                                   &names[i]);
                return static_cast<char *>(NGX_CONF_ERROR);
            }
            p->owners.push_back(pw->pw_uid);
        }
    }
    conf->script_policy = p;
    return NGX_CONF_OK;
}

// The shares of the worker's timers one location may take. Defaults: a
// quarter of lua_max_pending_timers and of lua_vm_memory_limit (256m when
// that is off), and 250ms of callback Lua time per second (docs/budgets.md
// says why). The http level's own configuration is never merged: timers
// of init_worker_by_lua get the same defaults (timersLimits).
void mergeTimerShares(ngx_conf_t *cf, LocConf *prev, LocConf *conf)
{
    auto *mcf = static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
    ngx_uint_t pending = mcf->max_pending_timers / 4;
    off_t memory = mcf->vm_memory_limit ? mcf->vm_memory_limit / 4
                                        : 256 * 1024 * 1024;
    ngx_conf_merge_uint_value(conf->timer_max_pending,
                              prev->timer_max_pending,
                              pending ? pending : 1);
    ngx_conf_merge_off_value(conf->timer_max_memory, prev->timer_max_memory,
                             memory);
    if (conf->timer_cpu == NGX_CONF_UNSET_MSEC) {
        conf->timer_cpu = prev->timer_cpu;
        conf->timer_cpu_interval = prev->timer_cpu_interval;
    }
    if (conf->timer_cpu == NGX_CONF_UNSET_MSEC) {
        conf->timer_cpu = 250;
        conf->timer_cpu_interval = 1000;
    }
}

// Remembers the location's (VM, policy) pair for buildEnvViews.
bool noteEnvView(ngx_conf_t *cf, const LocConf *conf)
{
    auto *mcf = static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
    if (mcf->env_views == nullptr) {
        mcf->env_views = ngx_array_create(cf->pool, 4, sizeof(EnvView));
        if (mcf->env_views == nullptr) {
            return false;
        }
    }
    auto *views = static_cast<EnvView *>(mcf->env_views->elts);
    for (ngx_uint_t i = 0; i < mcf->env_views->nelts; i++) {
        if (views[i].vm_slot == conf->vm_slot
            && views[i].policy == conf->sandbox)
        {
            return true;
        }
    }
    auto *v = static_cast<EnvView *>(ngx_array_push(mcf->env_views));
    if (v == nullptr) {
        return false;
    }
    v->vm_slot = conf->vm_slot;
    v->policy = conf->sandbox;
    return true;
}

// Builds the views of every policy in every VM that uses it, after
// init_worker_by_lua (the view is a snapshot of the worker's globals, as
// the first request would see them). Built by a request instead, it
// would take that request's time slice, and a slow build would fail it.
void buildEnvViews(MainConf *mcf, ngx_log_t *log)
{
    if (mcf->env_views == nullptr) {
        return;
    }
    auto *views = static_cast<EnvView *>(mcf->env_views->elts);
    for (ngx_uint_t i = 0; i < mcf->env_views->nelts; i++) {
        const sandbox::Policy *p = views[i].policy
                                       ? views[i].policy
                                       : &sandbox::defaultPolicy();
        Vm *vm = views[i].vm_slot ? views[i].vm_slot->vm : mcf->vm;
        if (!p->isolate || vm == nullptr) {
            continue;
        }
        std::string err;
        bool ok = false;
        entry::protect(vm->L(), [&] {
            ok = sandbox::prepareEnv(vm->L(), p);
        }, &err);
        if (!ok) {
            // Not fatal: the first request that needs it builds it.
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "luaguard: building the lua_sandbox view failed: "
                          "%s", (err.empty() ? sandbox::envError()
                                             : err).c_str());
        }
    }
}

char *mergeLocConf(ngx_conf_t *cf, void *parent, void *child)
{
    auto *prev = static_cast<LocConf *>(parent);
    auto *conf = static_cast<LocConf *>(child);

    // Phase handlers inherit like nginx's own handler directives. Content
    // inherits too, for an `if` block inside the location: nginx keeps the
    // location's content handler there, which must find the code. (Nested
    // locations do not get nginx's handler, so it never runs there.)
    for (auto field : {&LocConf::rewrite, &LocConf::access, &LocConf::log,
                       &LocConf::header_filter, &LocConf::body_filter,
                       &LocConf::content}) {
        if (conf->*field == nullptr) {
            conf->*field = prev->*field;
        }
    }
    ngx_conf_merge_value(conf->code_cache, prev->code_cache, 1);
    ngx_conf_merge_value(conf->need_request_body, prev->need_request_body, 0);
    ngx_conf_merge_value(conf->use_default_type, prev->use_default_type, 1);
    ngx_conf_merge_value(conf->transform_underscores,
                         prev->transform_underscores, 1);
    ngx_conf_merge_value(conf->http10_buffering, prev->http10_buffering, 1);
    ngx_conf_merge_value(conf->check_client_abort, prev->check_client_abort,
                         0);
    // Defaults: see docs/budgets.md for why these numbers.
    ngx_conf_merge_msec_value(conf->budget_slice, prev->budget_slice, 1000);
    ngx_conf_merge_msec_value(conf->budget_request, prev->budget_request,
                              10000);
    ngx_conf_merge_off_value(conf->budget_memory, prev->budget_memory,
                             256 * 1024 * 1024);
    ngx_conf_merge_uint_value(conf->budget_status, prev->budget_status,
                              NGX_HTTP_INTERNAL_SERVER_ERROR);
    ngx_conf_merge_uint_value(conf->budget_output_wait,
                              prev->budget_output_wait, 1);
    conf->limits.slice_ms = conf->budget_slice;
    conf->limits.total_ms = conf->budget_request;
    conf->limits.memory = conf->budget_memory;
    ngx_conf_merge_msec_value(conf->budget_timer_slice,
                              prev->budget_timer_slice, 1000);
    ngx_conf_merge_msec_value(conf->budget_timer, prev->budget_timer, 60000);
    conf->timer_limits.slice_ms = conf->budget_timer_slice;
    conf->timer_limits.total_ms = conf->budget_timer;
    conf->timer_limits.memory = conf->budget_memory;
    mergeTimerShares(cf, prev, conf);
    if (conf->sandbox == nullptr) {
        // Named here rather than left null for policyOf: a load instead of
        // a call per handler run.
        conf->sandbox = prev->sandbox ? prev->sandbox
                                      : &sandbox::defaultPolicy();
    }
    ngx_conf_merge_ptr_value(conf->vm_slot, prev->vm_slot, nullptr);
    if (!noteEnvView(cf, conf)) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }

    ngx_conf_merge_msec_value(conf->socket_connect_timeout,
                              prev->socket_connect_timeout, 60000);
    ngx_conf_merge_msec_value(conf->socket_send_timeout,
                              prev->socket_send_timeout, 60000);
    ngx_conf_merge_msec_value(conf->socket_read_timeout,
                              prev->socket_read_timeout, 60000);
    ngx_conf_merge_msec_value(conf->socket_keepalive_timeout,
                              prev->socket_keepalive_timeout, 60000);
    ngx_conf_merge_size_value(conf->socket_buffer_size,
                              prev->socket_buffer_size, ngx_pagesize);
    ngx_conf_merge_size_value(conf->socket_send_lowat,
                              prev->socket_send_lowat, 0);
    ngx_conf_merge_uint_value(conf->socket_pool_size, prev->socket_pool_size,
                              30);
    // Far below worker_connections (512 by default): one request cannot
    // take the slots every other client needs.
    ngx_conf_merge_uint_value(conf->socket_max_per_request,
                              prev->socket_max_per_request, 64);
    ngx_conf_merge_value(conf->socket_log_errors, prev->socket_log_errors, 1);
    ngx_conf_merge_str_value(conf->ssl_trusted_certificate,
                             prev->ssl_trusted_certificate, "");
    ngx_conf_merge_value(conf->ssl_verify_depth, prev->ssl_verify_depth, 1);
    // TLS 1.2 and 1.3 only: older protocols are off by default (hardening;
    // lua_ssl_protocols can still enable them).
    ngx_conf_merge_bitmask_value(conf->ssl_protocols, prev->ssl_protocols,
                                 (NGX_CONF_BITMASK_SET | NGX_SSL_TLSv1_2
                                  | NGX_SSL_TLSv1_3));
    ngx_conf_merge_str_value(conf->ssl_ciphers, prev->ssl_ciphers,
                             "DEFAULT");
    ngx_conf_merge_str_value(conf->ssl_crl, prev->ssl_crl, "");
    ngx_conf_merge_ptr_value(conf->ssl_conf_commands, prev->ssl_conf_commands,
                             nullptr);
    if (conf->pipe_limits == nullptr) {
        conf->pipe_limits = prev->pipe_limits;
    }
    if (conf->socket_buffer_size == 0) {
        conf->socket_buffer_size = ngx_pagesize;
    }
    metrics::mergeLoc(cf, conf);
    char *rv = mergeScriptPolicy(cf, prev, conf);
    if (rv == NGX_CONF_OK) {
        rv = mergeEgress(cf, prev, conf);
    }
    if (rv != NGX_CONF_OK) {
        return rv;
    }
    return api::mergeSocketSsl(cf, prev, conf);
}

// Adds `h` to a phase: first in the array means last to run (nginx builds
// its phase engine from the end), which is how "postponed" handlers run
// after the standard modules of their phase.
ngx_int_t addPhaseHandler(ngx_http_core_main_conf_t *cmcf, ngx_uint_t phase,
                          ngx_http_handler_pt h, bool postpone)
{
    ngx_array_t *arr = &cmcf->phases[phase].handlers;
    auto *slot = static_cast<ngx_http_handler_pt *>(ngx_array_push(arr));
    if (slot == nullptr) {
        return NGX_ERROR;
    }
    if (!postpone) {
        *slot = h;
        return NGX_OK;
    }
    auto *elts = static_cast<ngx_http_handler_pt *>(arr->elts);
    ngx_memmove(&elts[1], &elts[0], (arr->nelts - 1) * sizeof(*elts));
    elts[0] = h;
    return NGX_OK;
}

// lua_malloc_trim N: libc gives its cached free memory back to the
// system every N requests of this worker, counted in the log phase.
ngx_int_t mallocTrimHandler(ngx_http_request_t *r)
{
    static ngx_uint_t served;
    MainConf *mcf = g_mcf;
    if (mcf != nullptr && mcf->malloc_trim != 0
        && ++served >= mcf->malloc_trim)
    {
        served = 0;
        malloc_trim(1);
    }
    return NGX_DECLINED;
}

// lua_sa_restart: nginx installs its signal handlers without SA_RESTART;
// lua-nginx-module adds it in workers so that blocking calls made by C
// libraries from Lua are not interrupted by nginx's signals.
void addSaRestart()
{
    const int sigs[] = {SIGHUP, SIGUSR1, SIGWINCH, SIGTERM, SIGQUIT,
                        SIGUSR2, SIGALRM, SIGINT, SIGIO, SIGCHLD, SIGSYS,
                        SIGPIPE};
    for (int sig : sigs) {
        struct sigaction sa;
        if (sigaction(sig, nullptr, &sa) == 0 && sa.sa_handler != SIG_DFL
            && sa.sa_handler != SIG_IGN && !(sa.sa_flags & SA_RESTART))
        {
            sa.sa_flags |= SA_RESTART;
            sigaction(sig, &sa, nullptr);
        }
    }
}

// What every VM gets before init_by_lua runs in it: the shared
// dictionaries, lua_package_path/cpath and its memory ceiling.
ngx_int_t setUpVm(ngx_conf_t *cf, MainConf *mcf, Vm *vm, size_t ceiling)
{
    lua_State *L = vm->L();
    api::bindSharedDicts(L, mcf);
    capi::applyPreloads(mcf, L);
    std::string prefix(reinterpret_cast<char *>(cf->cycle->prefix.data),
                       cf->cycle->prefix.len);
    struct {
        ngx_str_t  *conf;
        const char *field;
    } paths[] = {{&mcf->package_path, "path"}, {&mcf->package_cpath, "cpath"}};
    for (auto &p : paths) {
        if (p.conf->len == 0) {
            continue;
        }
        lua_getglobal(L, "package");
        lua_getfield(L, -1, p.field);
        std::string defaults = lua_tostring(L, -1) ? lua_tostring(L, -1) : "";
        lua_pop(L, 1);
        std::string expanded = expandPackagePath(
            std::string_view(reinterpret_cast<char *>(p.conf->data),
                             p.conf->len),
            defaults, prefix);
        lua_pushlstring(L, expanded.data(), expanded.size());
        lua_setfield(L, -2, p.field);
        lua_pop(L, 1);
    }
    vm->memory().setCeiling(ceiling);
    return NGX_OK;
}

ngx_int_t postconfiguration(ngx_conf_t *cf)
{
    auto *mcf = static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
    auto *cmcf = static_cast<ngx_http_core_main_conf_t *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module));

    if (metrics::postconfiguration(cf) != NGX_OK) {
        return NGX_ERROR;
    }
    // init_worker_by_lua's timers run with the http level's own
    // configuration, which nginx never merges (its budgets, timeouts and
    // policies would stay unset, i.e. off): merged here with an empty
    // parent, as any location is.
    auto *hlcf = static_cast<LocConf *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_luaguard_module));
    void *defaults = createLocConf(cf);
    if (defaults == nullptr
        || mergeLocConf(cf, defaults, hlcf) != NGX_CONF_OK)
    {
        return NGX_ERROR;
    }
    if (mcf->vm == nullptr) {
        return NGX_OK;  // no Lua in this configuration
    }

    if (mcf->need_server_rewrite
        && addPhaseHandler(cmcf, NGX_HTTP_SERVER_REWRITE_PHASE,
                           entry::edge<glue::serverRewriteHandler>,
                           false) != NGX_OK)
    {
        return NGX_ERROR;
    }
    if (mcf->need_rewrite
        && addPhaseHandler(cmcf, NGX_HTTP_REWRITE_PHASE,
                           entry::edge<glue::rewriteHandler>,
                           !mcf->rewrite_no_postpone) != NGX_OK)
    {
        return NGX_ERROR;
    }
    if (mcf->need_access
        && addPhaseHandler(cmcf, NGX_HTTP_ACCESS_PHASE,
                           entry::edge<glue::accessHandler>,
                           !mcf->access_no_postpone) != NGX_OK)
    {
        return NGX_ERROR;
    }
    if (mcf->need_log
        && addPhaseHandler(cmcf, NGX_HTTP_LOG_PHASE,
                           entry::edge<glue::logHandler>, false)
               != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (mcf->malloc_trim != 0
        && addPhaseHandler(cmcf, NGX_HTTP_LOG_PHASE,
                           entry::edge<mallocTrimHandler>, false) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (glue::addWorkersZone(cf) != NGX_OK) {
        return NGX_ERROR;
    }
    glue::installFilters();

    if (setUpVm(cf, mcf, mcf->vm, mcf->vm_memory_limit) != NGX_OK) {
        return NGX_ERROR;
    }
    if (mcf->vms) {
        auto **slots = static_cast<VmSlot **>(mcf->vms->elts);
        for (ngx_uint_t i = 0; i < mcf->vms->nelts; i++) {
            VmSlot *slot = slots[i];
            slot->vm = openVm(cf);
            size_t limit = slot->memory_limit == NGX_CONF_UNSET_SIZE
                               ? mcf->vm_memory_limit : slot->memory_limit;
            if (slot->vm == nullptr
                || setUpVm(cf, mcf, slot->vm, limit) != NGX_OK)
            {
                return NGX_ERROR;
            }
        }
    }
    g_mcf = mcf;
    g_conf_cycle = cf->cycle;
    // With lua_shared_dict zones, init_by_lua runs from the last zone's
    // init callback, once the dictionaries exist.
    if (mcf->init && !shdict::deferInit(mcf)
        && glue::runInit(mcf, cf->log) != NGX_OK)
    {
        return NGX_ERROR;
    }
    return NGX_OK;
}

// Runs in the budget timer's signal handler, just before the worker exits
// (ngx_log_error only writes to the log's fd, as in nginx's own handlers).
void onStuck(const char *budget, uint64_t ms)
{
    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "luaguard: %s exceeded and Lua has not reached an "
                  "instruction for %uL ms (stuck inside a C function); "
                  "ending this worker so the master starts a new one",
                  budget, ms);
}

ngx_int_t initProcess(ngx_cycle_t *cycle)
{
    if (ngx_process == NGX_PROCESS_HELPER) {
        // Cache manager and loader: they run no requests, and exit without
        // calling exit_process, so nothing (no watchdog thread, no
        // init_worker_by_lua) is started in them, as in lua-nginx-module.
        return NGX_OK;
    }
    auto *mcf = static_cast<MainConf *>(
        ngx_http_cycle_get_module_main_conf(cycle, ngx_http_luaguard_module));
    if (mcf == nullptr || mcf->vm == nullptr) {
        metrics::initWorker(cycle);
        return NGX_OK;
    }
    g_mcf = mcf;
    subreq::installEgressHook(cycle->log);
    glue::registerWorker();
    metrics::initWorker(cycle);
    if (mcf->sa_restart) {
        addSaRestart();
    }
    api::installErrlogCapture(cycle, mcf);
    if (!budget::Guard::instance().start(mcf->watchdog_grace, onStuck))
    {
        ngx_log_error(NGX_LOG_ERR, cycle->log, ngx_errno,
                      "luaguard: the budget watchdog did not start; "
                      "runaway Lua will not be stopped in this worker");
    }
    if (mcf->init_worker) {
        // A failing init_worker_by_lua is logged, the worker still serves,
        // as in lua-nginx-module.
        glue::runWorkerCode(mcf->vm, mcf->init_worker, Phase::InitWorker,
                            cycle->log);
    }
    buildEnvViews(mcf, cycle->log);
    return NGX_OK;
}

void exitProcess(ngx_cycle_t *cycle)
{
    MainConf *mcf = g_mcf;
    if (mcf == nullptr || mcf->vm == nullptr) {
        return;
    }
    glue::firePendingTimers();
    budget::Guard::instance().stop();
    if (mcf->exit_worker) {
        glue::runWorkerCode(mcf->vm, mcf->exit_worker, Phase::ExitWorker,
                            cycle->log);
    }
    api::closePipes();   // no ngx.pipe command outlives its worker
}

ngx_http_module_t moduleCtx = {
    nullptr,                          // preconfiguration
    entry::edge<postconfiguration>,   // postconfiguration
    entry::edge<createMainConf>,      // create main configuration
    entry::edge<initMainConf>,        // init main configuration
    entry::edge<createSrvConf>,       // create server configuration
    entry::edge<mergeSrvConf>,        // merge server configuration
    entry::edge<createLocConf>,       // create location configuration
    entry::edge<mergeLocConf>,        // merge location configuration
};

}  // namespace

MainConf *mainConf()
{
    return g_mcf;
}

ngx_cycle_t *configCycle()
{
    return g_conf_cycle;
}

// For ngx/capi.cpp: the default VM of the configuration being parsed,
// and whether postconfiguration has set its VMs up.
Vm *defaultVm(ngx_conf_t *cf)
{
    return ensureVm(cf);
}

bool vmsSetUp(MainConf *mcf)
{
    return g_mcf == mcf;
}

}  // namespace luaguard

ngx_module_t ngx_http_luaguard_module = {
    NGX_MODULE_V1,
    &luaguard::moduleCtx,    // module context
    luaguard::commands,      // module directives
    NGX_HTTP_MODULE,         // module type
    nullptr,                 // init master
    nullptr,                 // init module
    luaguard::entry::edge<luaguard::initProcess>,  // init process
    nullptr,                 // init thread
    nullptr,                 // exit thread
    luaguard::entry::edge<luaguard::exitProcess>,  // exit process
    nullptr,                 // exit master
    NGX_MODULE_V1_PADDING};
