#include "ngx/metrics.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <unordered_map>

#include "api/api.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "runtime/vm.hpp"
#include "shdict/zone.hpp"

namespace luaguard::metrics {

const uint64_t kBucketNs[kBuckets] = {
    100000ull,       250000ull,       500000ull,      1000000ull,
    2500000ull,      5000000ull,      10000000ull,    25000000ull,
    50000000ull,     100000000ull,    250000000ull,   500000000ull,
    1000000000ull,   2500000000ull,   5000000000ull,  10000000000ull};

namespace {

const char *const kBucketText[kBuckets] = {
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
    "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10"};

// Labels of LocSlot::stops, in budget::Kind order (Slice .. VmMemory).
const char *const kStopText[kStopKinds] = {"slice", "request", "memory",
                                           "vm_memory"};

// Labels of LocSlot::budget_refusals, in BudgetRefusal order.
const char *const kRefusalText[kBudgetRefusalKinds] = {"memory",
                                                       "connections"};

// Labels of LocSlot::timer_stops, in TimerStop order.
const char *const kTimerStopText[kTimerStopKinds] = {"pending", "memory",
                                                     "cpu"};

constexpr int kSlots = 512;         // slot 0: "(other)"
constexpr int kWorkers = 64;        // gauges of workers 0 .. 63
constexpr uint64_t kMagic = 0x6c67'6d65'7472'6963ull;   // "lgmetric"
constexpr uint32_t kVersion = 3;   // 3: LocSlot::budget_refusals
const char kOther[] = "(other)";

// A worker's gauges, written by that worker only (plain stores).
struct WorkerSlot {
    ngx_atomic_t  gen;       // configuration generation of the writer
    ngx_atomic_t  pid;
    ngx_atomic_t  vm_in_use;
    ngx_atomic_t  vm_ceiling;
    ngx_atomic_t  vm_peak;
    ngx_atomic_t  vm_freed;
    ngx_atomic_t  timers_pending;
    ngx_atomic_t  timers_running;
    ngx_atomic_t  pool_idle;
};

struct Table {
    uint64_t      magic;
    uint32_t      version;
    uint32_t      has_lua[kSlots];     // the slot's location has handlers
    ngx_atomic_t  generation;          // bumped by every configuration
    LocSlot       slots[kSlots];
    WorkerSlot    workers[kWorkers];
};

// Configuration-time state (MainConf::metrics), in the cycle's pool.
struct Conf {
    std::unordered_map<std::string, Loc *> by_name;
    ngx_array_t   locs;                // of Loc *, in configuration order
    ngx_array_t   lua_flags;           // of uint32_t, parallel to locs
};

// Set in the master when the zone is initialised, inherited by fork.
Table *g_table = nullptr;
LocSlot *g_other = nullptr;
uint64_t g_gen = 0;
// When a request last published the gauges (ngx_current_msec).
ngx_msec_t g_published = 0;
// A request's end publishes the worker's gauges when they are older than
// this: under load, one in many requests pays for the stores; a scrape
// and the one-second tick publish whatever their age.
constexpr ngx_msec_t kPublishEveryMs = 50;
ngx_event_t g_tick;

const ngx_str_t kZoneName = ngx_string("luaguard_metrics");

void destroyConf(void *data)
{
    static_cast<Conf *>(data)->~Conf();
}

Conf *confOf(ngx_conf_t *cf)
{
    auto *mcf = static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
    if (mcf->metrics) {
        return static_cast<Conf *>(mcf->metrics);
    }
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(cf->pool, sizeof(Conf));
    if (cln == nullptr) {
        return nullptr;
    }
    auto *c = new (cln->data) Conf();
    cln->handler = destroyConf;
    if (ngx_array_init(&c->locs, cf->pool, 16, sizeof(Loc *)) != NGX_OK
        || ngx_array_init(&c->lua_flags, cf->pool, 16, sizeof(uint32_t))
               != NGX_OK)
    {
        return nullptr;
    }
    mcf->metrics = c;
    return c;
}

void store(ngx_atomic_t *p, uint64_t v)
{
    __atomic_store_n(p, static_cast<ngx_atomic_uint_t>(v), __ATOMIC_RELAXED);
}

uint64_t load(const ngx_atomic_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

// The worker's gauges into its slot. `full` adds what costs a walk
// (cosocket pools): the periodic refresh and scrapes, not every request.
void publish(bool full)
{
    if (g_table == nullptr || ngx_worker >= kWorkers
        || (ngx_process != NGX_PROCESS_WORKER
            && ngx_process != NGX_PROCESS_SINGLE))
    {
        return;
    }
    // A worker of an older configuration, shutting down after a reload,
    // leaves the slot to its successor.
    if (load(&g_table->generation) != g_gen) {
        return;
    }
    WorkerSlot &w = g_table->workers[ngx_worker];
    MainConf *mcf = mainConf();
    if (mcf && mcf->vm) {
        // The worker's VMs together (lua_vm): what the worker holds.
        MemoryAccount total;
        bool unbounded = false;  // a VM with no ceiling: none in all
        auto add = [&](Vm *vm) {
            MemoryAccount &m = vm->memory();
            total.in_use += m.in_use;
            total.ceiling += m.ceiling;
            unbounded = unbounded || m.ceiling == 0;
            total.peak += m.peak;
            total.freed += m.freed;
        };
        add(mcf->vm);
        if (mcf->vms) {
            auto **slots = static_cast<VmSlot **>(mcf->vms->elts);
            for (ngx_uint_t i = 0; i < mcf->vms->nelts; i++) {
                add(slots[i]->vm);
            }
        }
        store(&w.vm_in_use, total.in_use);
        store(&w.vm_ceiling, unbounded ? 0 : total.ceiling);
        store(&w.vm_peak, total.peak);
        store(&w.vm_freed, total.freed);
    }
    store(&w.timers_pending, glue::timersPending());
    store(&w.timers_running, glue::timersRunning());
    if (full) {
        store(&w.pool_idle, api::socketPoolIdle());
    }
    store(&w.pid, static_cast<uint64_t>(ngx_pid));
    store(&w.gen, g_gen);
}

void tick(ngx_event_t *ev)
{
    publish(true);
    if (!ngx_exiting && !ngx_quit && !ngx_terminate) {
        ngx_add_timer(ev, 1000);
    }
}

void onRefusal(sandbox::Capability c)
{
    int i = static_cast<int>(c);
    if (i < 0 || i >= sandbox::kCapabilityCount) {
        return;
    }
    if (LocSlot *s = slotOf(g_run ? g_run->ctx : nullptr)) {
        add(&s->refusals[i]);
    }
}

void setName(LocSlot *s, const char *name, size_t len)
{
    len = len < sizeof(s->name) ? len : sizeof(s->name);
    std::memcpy(s->name, name, len);
    s->name_len = static_cast<uint32_t>(len);
}

bool sameName(const LocSlot &s, const ngx_str_t &name)
{
    size_t len = name.len < sizeof(s.name) ? name.len : sizeof(s.name);
    return s.name_len == len && std::memcmp(s.name, name.data, len) == 0;
}

// Finds the slot this configuration's location `name` uses: the one it
// had before a reload (so its counters go on), a never used one, or one
// no location of this configuration uses any more.
int claimSlot(Table *t, const ngx_str_t &name, uint64_t gen)
{
    for (int i = 1; i < kSlots; i++) {
        if (t->slots[i].name_len && sameName(t->slots[i], name)) {
            return i;
        }
    }
    for (int i = 1; i < kSlots; i++) {
        if (t->slots[i].name_len == 0) {
            return i;
        }
    }
    for (int i = 1; i < kSlots; i++) {
        if (load(&t->slots[i].gen) != gen) {
            std::memset(static_cast<void *>(&t->slots[i]), 0,
                        sizeof(LocSlot));
            return i;
        }
    }
    return 0;
}

ngx_int_t initZone(ngx_shm_zone_t *zone, void *data)
{
    auto *pool = reinterpret_cast<ngx_slab_pool_t *>(zone->shm.addr);
    auto *t = static_cast<Table *>(pool->data);

    // Kept across reloads (same name and size): the counters go on. A
    // table of another layout is started afresh.
    if ((data == nullptr && !zone->shm.exists) || t == nullptr) {
        t = static_cast<Table *>(ngx_slab_alloc(pool, sizeof(Table)));
        if (t == nullptr) {
            return NGX_ERROR;
        }
        pool->data = t;
        t->magic = 0;
    }
    if (t->magic != kMagic || t->version != kVersion) {
        std::memset(static_cast<void *>(t), 0, sizeof(Table));
        t->magic = kMagic;
        t->version = kVersion;
    }

    uint64_t gen = ngx_atomic_fetch_add(&t->generation, 1) + 1;
    setName(&t->slots[0], kOther, sizeof(kOther) - 1);
    store(&t->slots[0].gen, gen);
    t->has_lua[0] = 1;

    auto *conf = static_cast<Conf *>(zone->data);
    if (conf) {
        auto **locs = static_cast<Loc **>(conf->locs.elts);
        auto *flags = static_cast<uint32_t *>(conf->lua_flags.elts);
        for (ngx_uint_t i = 0; i < conf->locs.nelts; i++) {
            int idx = claimSlot(t, locs[i]->name, gen);
            LocSlot *s = &t->slots[idx];
            if (idx != 0) {
                setName(s, reinterpret_cast<char *>(locs[i]->name.data),
                        locs[i]->name.len);
                store(&s->gen, gen);
                t->has_lua[idx] = flags[i];
            }
            locs[i]->slot = s;
        }
    }
    g_table = t;
    g_other = &t->slots[0];
    g_gen = gen;
    return NGX_OK;
}

ngx_int_t handler(ngx_http_request_t *r)
{
    if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }
    ngx_int_t rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }
    auto *mcf = static_cast<MainConf *>(
        ngx_http_get_module_main_conf(r, ngx_http_luaguard_module));
    std::string text;
    try {
        text = render(mcf);
    } catch (const std::bad_alloc &) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    static const ngx_str_t type =
        ngx_string("text/plain; version=0.0.4; charset=utf-8");
    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_type = type;
    r->headers_out.content_type_len = type.len;
    r->headers_out.content_length_n = static_cast<off_t>(text.size());
    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }
    ngx_buf_t *b = ngx_create_temp_buf(r->pool, text.size());
    if (b == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    b->last = ngx_cpymem(b->pos, text.data(), text.size());
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;
    ngx_chain_t out{b, nullptr};
    return ngx_http_output_filter(r, &out);
}

// ---- rendering ----

void appendEscaped(std::string &out, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '\\') {
            out += "\\\\";
        } else if (c == '"') {
            out += "\\\"";
        } else if (c == '\n') {
            out += "\\n";
        } else {
            out.push_back(c);
        }
    }
}

void appendU(std::string &out, uint64_t v)
{
    char buf[24];
    int n = std::snprintf(buf, sizeof(buf), "%llu",
                          static_cast<unsigned long long>(v));
    out.append(buf, n);
}

void appendSeconds(std::string &out, uint64_t ns)
{
    char buf[40];
    int n = std::snprintf(buf, sizeof(buf), "%.9f",
                          static_cast<double>(ns) / 1e9);
    out.append(buf, n);
}

void header(std::string &out, const char *name, const char *type,
            const char *help)
{
    out += "# HELP ";
    out += name;
    out += ' ';
    out += help;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
}

// The slots a scrape shows: this configuration's locations with Lua, and
// any that ran Lua (set_by_lua alone, code outside locations).
bool shown(const Table *t, int i)
{
    const LocSlot &s = t->slots[i];
    return s.name_len && load(&s.gen) == g_gen
           && (t->has_lua[i] || load(&s.runs));
}

template <typename F>
void perLocation(std::string &out, const char *name, const char *extra, F f)
{
    for (int i = 0; i < kSlots; i++) {
        if (!shown(g_table, i)) {
            continue;
        }
        const LocSlot &s = g_table->slots[i];
        out += name;
        out += "{location=\"";
        appendEscaped(out, s.name, s.name_len);
        out += '"';
        if (extra) {
            out += extra;
        }
        out += "} ";
        appendU(out, f(s));
        out += '\n';
    }
}

template <typename F>
void perWorker(std::string &out, const char *name, F f)
{
    for (int i = 0; i < kWorkers; i++) {
        const WorkerSlot &w = g_table->workers[i];
        if (load(&w.gen) != g_gen || load(&w.pid) == 0) {
            continue;
        }
        out += name;
        out += "{worker=\"";
        appendU(out, static_cast<uint64_t>(i));
        out += "\"} ";
        appendU(out, f(w));
        out += '\n';
    }
}

}  // namespace

LocSlot *slotOf(const RequestCtx *ctx)
{
    return slotOf(ctx ? ctx->llcf : nullptr);
}

LocSlot *slotOf(const LocConf *lcf)
{
    if (lcf && lcf->metrics) {
        LocSlot *s = static_cast<Loc *>(lcf->metrics)->slot;
        if (s) {
            return s;
        }
    }
    return g_other;
}

void requestDone(const RequestCtx *ctx)
{
    LocSlot *s = slotOf(ctx);
    if (s == nullptr) {
        return;
    }
    auto k = static_cast<int>(ctx->usage.tripped);
    if (k > 0 && k <= kStopKinds) {
        add(&s->stops[k - 1]);
    }
    if (!ctx->is_timer && ctx->usage.lua_ns) {
        uint64_t ns = ctx->usage.lua_ns;
        int b = 0;
        while (b < kBuckets && ns > kBucketNs[b]) {
            b++;
        }
        add(&s->cpu[b]);
        add(&s->cpu_sum_ns, static_cast<ngx_atomic_int_t>(ns));
    }
    if (ngx_current_msec - g_published >= kPublishEveryMs) {
        g_published = ngx_current_msec;
        publish(false);
    }
}

char *directive(ngx_conf_t *cf, ngx_command_t *, void *)
{
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    clcf->handler = entry::edge<handler>;
    return confOf(cf) ? NGX_CONF_OK : static_cast<char *>(NGX_CONF_ERROR);
}

void mergeLoc(ngx_conf_t *cf, LocConf *conf)
{
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
    if (clcf == nullptr || clcf->name.len == 0) {
        return;  // a server's own configuration: "(other)"
    }
    Conf *c = confOf(cf);
    if (c == nullptr) {
        return;
    }
    uint32_t lua = conf->rewrite || conf->access || conf->content
                   || conf->log || conf->header_filter || conf->body_filter;
    std::string key(reinterpret_cast<char *>(clcf->name.data),
                    clcf->name.len);
    auto it = c->by_name.find(key);
    if (it != c->by_name.end()) {
        conf->metrics = it->second;
        auto **locs = static_cast<Loc **>(c->locs.elts);
        auto *flags = static_cast<uint32_t *>(c->lua_flags.elts);
        for (ngx_uint_t i = 0; i < c->locs.nelts; i++) {
            if (locs[i] == it->second) {
                flags[i] |= lua;
            }
        }
        return;
    }
    auto *loc = static_cast<Loc *>(ngx_pcalloc(cf->pool, sizeof(Loc)));
    auto **slot = static_cast<Loc **>(ngx_array_push(&c->locs));
    auto *flag = static_cast<uint32_t *>(ngx_array_push(&c->lua_flags));
    if (loc == nullptr || slot == nullptr || flag == nullptr) {
        return;  // counted under "(other)"
    }
    loc->name = clcf->name;
    *slot = loc;
    *flag = lua;
    c->by_name.emplace(std::move(key), loc);
    conf->metrics = loc;
}

ngx_int_t postconfiguration(ngx_conf_t *cf)
{
    Conf *c = confOf(cf);
    if (c == nullptr) {
        return NGX_ERROR;
    }
    // A fixed size: a reload finds the zone of the same name and size and
    // keeps it, whatever the new configuration's locations.
    size_t size = sizeof(Table) + 64 * 1024;
    size = (size + ngx_pagesize - 1) & ~(ngx_pagesize - 1);
    ngx_str_t name = kZoneName;
    ngx_shm_zone_t *zone = ngx_shared_memory_add(cf, &name, size,
                                                 &ngx_http_luaguard_module);
    if (zone == nullptr) {
        return NGX_ERROR;
    }
    zone->init = initZone;
    zone->data = c;
    zone->noreuse = 0;
    sandbox::setRefusalHook(onRefusal);
    return NGX_OK;
}

void initWorker(ngx_cycle_t *cycle)
{
    if (g_table == nullptr
        || (ngx_process != NGX_PROCESS_WORKER
            && ngx_process != NGX_PROCESS_SINGLE))
    {
        return;
    }
    publish(true);
    g_tick.handler = entry::edge<tick>;
    g_tick.data = &g_tick;
    g_tick.log = cycle->log;
    // Never holds up a graceful exit.
    g_tick.cancelable = 1;
    ngx_add_timer(&g_tick, 1000);
}

std::string render(MainConf *mcf)
{
    publish(true);
    std::string out;
    out.reserve(16384);
    if (g_table == nullptr) {
        return out;
    }

    header(out, "luaguard_lua_runs_total", "counter",
           "Lua handler runs (entry threads, timer callbacks, runs of the "
           "non-yielding phases).");
    perLocation(out, "luaguard_lua_runs_total", nullptr,
                [](const LocSlot &s) { return load(&s.runs); });

    header(out, "luaguard_lua_errors_total", "counter",
           "Lua runs that ended with an error (budget stops included).");
    perLocation(out, "luaguard_lua_errors_total", nullptr,
                [](const LocSlot &s) { return load(&s.errors); });

    header(out, "luaguard_budget_stops_total", "counter",
           "Requests and timers stopped by an execution budget.");
    for (int k = 0; k < kStopKinds; k++) {
        std::string extra = std::string(",kind=\"") + kStopText[k] + "\"";
        perLocation(out, "luaguard_budget_stops_total", extra.c_str(),
                    [k](const LocSlot &s) { return load(&s.stops[k]); });
    }

    header(out, "luaguard_budget_refusals_total", "counter",
           "API calls refused by a budget (memory outside Lua, which "
           "stops the request; cosockets per request).");
    for (int k = 0; k < kBudgetRefusalKinds; k++) {
        std::string extra = std::string(",kind=\"") + kRefusalText[k] + "\"";
        perLocation(out, "luaguard_budget_refusals_total", extra.c_str(),
                    [k](const LocSlot &s) {
                        return load(&s.budget_refusals[k]);
                    });
    }

    header(out, "luaguard_timer_stops_total", "counter",
           "Timers refused (pending slots, argument memory) or firings "
           "skipped or delayed (callback Lua time) by the location's "
           "timer shares.");
    for (int k = 0; k < kTimerStopKinds; k++) {
        std::string extra = std::string(",kind=\"") + kTimerStopText[k]
                            + "\"";
        perLocation(out, "luaguard_timer_stops_total", extra.c_str(),
                    [k](const LocSlot &s) { return load(&s.timer_stops[k]); });
    }

    header(out, "luaguard_sandbox_refusals_total", "counter",
           "Uses of a capability the location's lua_sandbox refuses.");
    for (int c = 0; c < sandbox::kCapabilityCount; c++) {
        std::string extra = std::string(",capability=\"")
            + sandbox::capabilityName(static_cast<sandbox::Capability>(c))
            + "\"";
        perLocation(out, "luaguard_sandbox_refusals_total", extra.c_str(),
                    [c](const LocSlot &s) { return load(&s.refusals[c]); });
    }

    header(out, "luaguard_egress_refusals_total", "counter",
           "Cosocket connections refused by the egress policy.");
    perLocation(out, "luaguard_egress_refusals_total", nullptr,
                [](const LocSlot &s) { return load(&s.egress); });

    header(out, "luaguard_cosocket_connects_total", "counter",
           "TCP cosocket connections opened (not taken from a pool).");
    perLocation(out, "luaguard_cosocket_connects_total", nullptr,
                [](const LocSlot &s) { return load(&s.connects); });

    header(out, "luaguard_cosocket_pool_hits_total", "counter",
           "TCP cosocket connects served by an idle pooled connection.");
    perLocation(out, "luaguard_cosocket_pool_hits_total", nullptr,
                [](const LocSlot &s) { return load(&s.pool_hits); });

    header(out, "luaguard_lua_cpu_seconds", "histogram",
           "Lua time of one request, all phases together.");
    for (int i = 0; i < kSlots; i++) {
        if (!shown(g_table, i)) {
            continue;
        }
        const LocSlot &s = g_table->slots[i];
        std::string label;
        appendEscaped(label, s.name, s.name_len);
        uint64_t cum = 0;
        for (int b = 0; b <= kBuckets; b++) {
            cum += load(&s.cpu[b]);
            out += "luaguard_lua_cpu_seconds_bucket{location=\"";
            out += label;
            out += "\",le=\"";
            out += b < kBuckets ? kBucketText[b] : "+Inf";
            out += "\"} ";
            appendU(out, cum);
            out += '\n';
        }
        out += "luaguard_lua_cpu_seconds_sum{location=\"" + label + "\"} ";
        appendSeconds(out, load(&s.cpu_sum_ns));
        out += "\nluaguard_lua_cpu_seconds_count{location=\"" + label
               + "\"} ";
        appendU(out, cum);
        out += '\n';
    }

    header(out, "luaguard_vm_memory_bytes", "gauge",
           "Memory the worker's Lua VM holds.");
    perWorker(out, "luaguard_vm_memory_bytes",
              [](const WorkerSlot &w) { return load(&w.vm_in_use); });
    header(out, "luaguard_vm_memory_ceiling_bytes", "gauge",
           "lua_vm_memory_limit of the worker's VM (0: none).");
    perWorker(out, "luaguard_vm_memory_ceiling_bytes",
              [](const WorkerSlot &w) { return load(&w.vm_ceiling); });
    header(out, "luaguard_vm_memory_peak_bytes", "gauge",
           "The most memory the worker's Lua VM has held.");
    perWorker(out, "luaguard_vm_memory_peak_bytes",
              [](const WorkerSlot &w) { return load(&w.vm_peak); });
    header(out, "luaguard_vm_freed_bytes_total", "counter",
           "Bytes the worker's Lua VM has given back (garbage collected).");
    perWorker(out, "luaguard_vm_freed_bytes_total",
              [](const WorkerSlot &w) { return load(&w.vm_freed); });
    header(out, "luaguard_timers_pending", "gauge",
           "ngx.timer callbacks waiting to fire.");
    perWorker(out, "luaguard_timers_pending",
              [](const WorkerSlot &w) { return load(&w.timers_pending); });
    header(out, "luaguard_timers_running", "gauge",
           "ngx.timer callbacks running.");
    perWorker(out, "luaguard_timers_running",
              [](const WorkerSlot &w) { return load(&w.timers_running); });
    header(out, "luaguard_cosocket_pool_idle", "gauge",
           "Idle connections kept in the worker's cosocket pools.");
    perWorker(out, "luaguard_cosocket_pool_idle",
              [](const WorkerSlot &w) { return load(&w.pool_idle); });

    shdict::Zones *zs = mcf ? shdict::zones(mcf) : nullptr;
    header(out, "luaguard_shdict_capacity_bytes", "gauge",
           "Size of the lua_shared_dict zone.");
    std::string free_lines;
    if (zs) {
        auto **elts = static_cast<shdict::Zone **>(zs->list.elts);
        for (ngx_uint_t i = 0; i < zs->list.nelts; i++) {
            shdict::Zone *z = elts[i];
            if (!z->ready) {
                continue;
            }
            std::string label;
            appendEscaped(label, reinterpret_cast<char *>(z->name.data),
                          z->name.len);
            out += "luaguard_shdict_capacity_bytes{dict=\"" + label + "\"} ";
            appendU(out, z->shm_zone->shm.size);
            out += '\n';
            free_lines += "luaguard_shdict_free_bytes{dict=\"" + label
                          + "\"} ";
            appendU(free_lines, z->store.freeSpace());
            free_lines += '\n';
        }
    }
    header(out, "luaguard_shdict_free_bytes", "gauge",
           "Free pages of the lua_shared_dict zone, in bytes.");
    out += free_lines;
    return out;
}

void pushTable(lua_State *L, MainConf *mcf)
{
    publish(true);
    lua_createtable(L, 0, 3);

    lua_newtable(L);  // locations
    for (int i = 0; g_table && i < kSlots; i++) {
        if (!shown(g_table, i)) {
            continue;
        }
        const LocSlot &s = g_table->slots[i];
        lua_pushlstring(L, s.name, s.name_len);
        lua_createtable(L, 0, 8);
        auto num = [L](const char *k, uint64_t v) {
            lua_pushnumber(L, static_cast<lua_Number>(v));
            lua_setfield(L, -2, k);
        };
        num("runs", load(&s.runs));
        num("errors", load(&s.errors));
        num("egress_refusals", load(&s.egress));
        num("cosocket_connects", load(&s.connects));
        num("cosocket_pool_hits", load(&s.pool_hits));
        lua_createtable(L, 0, kStopKinds);
        for (int k = 0; k < kStopKinds; k++) {
            num(kStopText[k], load(&s.stops[k]));
        }
        lua_setfield(L, -2, "budget_stops");
        lua_createtable(L, 0, kTimerStopKinds);
        for (int k = 0; k < kTimerStopKinds; k++) {
            num(kTimerStopText[k], load(&s.timer_stops[k]));
        }
        lua_setfield(L, -2, "timer_stops");
        lua_createtable(L, 0, kBudgetRefusalKinds);
        for (int k = 0; k < kBudgetRefusalKinds; k++) {
            num(kRefusalText[k], load(&s.budget_refusals[k]));
        }
        lua_setfield(L, -2, "budget_refusals");
        lua_createtable(L, 0, sandbox::kCapabilityCount);
        for (int c = 0; c < sandbox::kCapabilityCount; c++) {
            num(sandbox::capabilityName(static_cast<sandbox::Capability>(c)),
                load(&s.refusals[c]));
        }
        lua_setfield(L, -2, "sandbox_refusals");

        lua_createtable(L, 0, 3);   // cpu_seconds
        lua_createtable(L, kBuckets + 1, 0);
        uint64_t cum = 0;
        for (int b = 0; b <= kBuckets; b++) {
            cum += load(&s.cpu[b]);
            lua_createtable(L, 0, 2);
            lua_pushnumber(L, b < kBuckets ? kBucketNs[b] / 1e9 : HUGE_VAL);
            lua_setfield(L, -2, "le");
            num("count", cum);
            lua_rawseti(L, -2, b + 1);
        }
        lua_setfield(L, -2, "buckets");
        num("count", cum);
        lua_pushnumber(L, load(&s.cpu_sum_ns) / 1e9);
        lua_setfield(L, -2, "sum");
        lua_setfield(L, -2, "cpu_seconds");
        lua_rawset(L, -3);
    }
    lua_setfield(L, -2, "locations");

    lua_newtable(L);  // workers, by worker number (from 0)
    for (int i = 0; g_table && i < kWorkers; i++) {
        const WorkerSlot &w = g_table->workers[i];
        if (load(&w.gen) != g_gen || load(&w.pid) == 0) {
            continue;
        }
        lua_createtable(L, 0, 8);
        auto num = [L](const char *k, uint64_t v) {
            lua_pushnumber(L, static_cast<lua_Number>(v));
            lua_setfield(L, -2, k);
        };
        num("pid", load(&w.pid));
        num("vm_memory_bytes", load(&w.vm_in_use));
        num("vm_memory_ceiling_bytes", load(&w.vm_ceiling));
        num("vm_memory_peak_bytes", load(&w.vm_peak));
        num("vm_freed_bytes", load(&w.vm_freed));
        num("timers_pending", load(&w.timers_pending));
        num("timers_running", load(&w.timers_running));
        num("cosocket_pool_idle", load(&w.pool_idle));
        lua_rawseti(L, -2, i);
    }
    lua_setfield(L, -2, "workers");

    lua_newtable(L);  // shdict
    shdict::Zones *zs = mcf ? shdict::zones(mcf) : nullptr;
    for (ngx_uint_t i = 0; zs && i < zs->list.nelts; i++) {
        shdict::Zone *z = static_cast<shdict::Zone **>(zs->list.elts)[i];
        if (!z->ready) {
            continue;
        }
        lua_pushlstring(L, reinterpret_cast<char *>(z->name.data),
                        z->name.len);
        lua_createtable(L, 0, 2);
        lua_pushnumber(L, static_cast<lua_Number>(z->shm_zone->shm.size));
        lua_setfield(L, -2, "capacity");
        lua_pushnumber(L, static_cast<lua_Number>(z->store.freeSpace()));
        lua_setfield(L, -2, "free");
        lua_rawset(L, -3);
    }
    lua_setfield(L, -2, "shdict");
}

}  // namespace luaguard::metrics
