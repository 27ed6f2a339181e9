// ngx.re.match / find / gmatch / sub / gsub and require "ngx.re" (split,
// opt), on PCRE2 with JIT.
//
// Compiled patterns live in a `Regex`. With the "o" option they are kept
// in a per-worker LRU cache (lua_regex_cache_max_entries) and reuse their
// match data, so the hot path neither compiles nor allocates beyond the
// result. Every pcre2 call runs with a match limit (lua_regex_match_limit,
// hardened default below) so catastrophic backtracking at one start
// position fails fast with lua-nginx-module's "pcre_exec() failed: -8".
//
// The limit does not bound a call's time: PCRE2 restarts the count at
// every start position, and one step may scan the rest of the subject
// (`a*a*[^a]` over 57 KB: 0.6 s with JIT, minutes without). Cutting the
// scan into slices of start positions does not help (one position can
// take seconds, and JIT's memo of failed positions is lost at every
// call: ten times slower). So a match is run where the budget's signal
// handler can leave it: when the run's CPU budget (lua_budget_slice /
// lua_budget_request) trips during a pcre2 call, the handler jumps back
// to exec(), which fails with -8 (PcreHeap keeps PCRE2's memory sound
// across the jump) and the budget's hook ends the script as soon as it
// is back in Lua. The watchdog never has to end the worker for a regex.
//
// Where luaguard differs from lua-nginx-module (with lua-resty-core, the
// reference), on purpose:
// - Compile errors carry PCRE2's wording ("missing closing parenthesis"
//   where PCRE1 said "missing )") in the same `pcre_compile() failed: MSG
//   in "PATTERN" at "REST"` format. Exec errors keep PCRE1's numbers (-8
//   match limit, -10 bad UTF-8, -11 bad UTF-8 offset, -19 DFA workspace,
//   -21 depth/heap limit, -27 JIT stack); others are PCRE2's own codes.
// - Without lua_regex_match_limit the limit is 1,000,000 steps, not the
//   PCRE default (10,000,000; still what `lua_regex_match_limit 0` gives).
// - "U" does not skip UTF-8 validation: invalid input is an error (-10),
//   never undefined behaviour inside PCRE.
// - With "u", an empty match moves the search on by a whole character
//   (the reference moves one byte and fails with -11 inside a character).
// - When the compile-once cache is full the least recently used pattern
//   is evicted (lua-resty-core's documented LRU) and the documented
//   "lua exceeding regex cache max entries" warning is logged once.
// - ngx.re.split follows Perl for empty matches and captures (unmatched
//   groups are left out), where lua-resty-core garbles some fields.

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <csetjmp>
#include <csignal>
#include <cstring>
#include <string>
#include <vector>

#include "api/api.hpp"
#include "api/ffi_abi.hpp"
#include "ngx/module.hpp"
#include "runtime/regex_cache.hpp"
#include "runtime/regex_heap.hpp"
#include "runtime/regex_options.hpp"
#include "runtime/regex_template.hpp"
#include "security/budget.hpp"
#include "security/log_escape.hpp"

namespace luaguard::api {

namespace {

using regex::Options;
using regex::ReplTemplate;

// Used when lua_regex_match_limit is not configured: a legitimate pattern
// stays far below it, while exponential backtracking on hostile input is
// stopped within milliseconds instead of PCRE2's default 10,000,000 steps.
constexpr uint32_t kDefaultMatchLimit = 1000000;

constexpr size_t kJitStackStart = 32 * 1024;
constexpr size_t kJitStackMaxDefault = 1024 * 1024;

struct Regex {
    pcre2_code        *code = nullptr;
    pcre2_match_data  *md = nullptr;
    uint32_t           ncap = 0;        // capture groups, group 0 excluded
    uint32_t           flags = 0;       // regex::CompileFlag bits
    struct Name {
        std::string    name;
        uint32_t       group;
    };
    std::vector<Name>  names;           // name-table order: dupes adjacent
    int                refs = 0;        // calls and iterators using it
    bool               cached = false;  // owned by the cache too
    regex::LruCache<Regex *>::Handle lru;  // its cache entry, when cached
    int                serial = 0;      // identity while cached, for the
                                        // FFI side's name tables
    // Memo of the last replacement template used with this pattern, so
    // gsub(..., "o") in a loop does not re-parse its template.
    std::string        tpl_src;
    ReplTemplate       tpl;
    bool               tpl_ok = false;
};

void destroy(Regex *re)
{
    if (re->md) {
        pcre2_match_data_free(re->md);
    }
    if (re->code) {
        pcre2_code_free(re->code);
    }
    delete re;
}

void release(Regex *re)
{
    if (--re->refs == 0 && !re->cached) {
        destroy(re);
    }
}

// Holds a reference for the duration of one API call. LuaJIT unwinds
// errors through C++ frames (external unwinding on x64), so a Lua error
// raised by a replacement callback still runs this destructor.
class RegexRef {
 public:
    explicit RegexRef(Regex *re) : re_(re) {}
    ~RegexRef()
    {
        if (re_) {
            release(re_);
        }
    }
    RegexRef(const RegexRef &) = delete;
    RegexRef &operator=(const RegexRef &) = delete;
    Regex *get() const { return re_; }
    Regex *operator->() const { return re_; }

 private:
    Regex *re_;
};

luaguard_re_result_t g_result;

// ---- per-worker state ----

// Recently used cache entries by the address of the pattern's Lua string:
// Lua strings are interned, so a loop using one pattern finds it here
// without hashing it (the bytes are still compared, as the address may
// have been reused by another string).
struct MemoSlot {
    const char  *pat = nullptr;
    Regex       *re = nullptr;
};
constexpr size_t kMemoSlots = 64;

// The original tostring, in each VM's registry.
constexpr const char *kToString = "luaguard.re.tostring";

struct State {
    regex::LruCache<Regex *>  cache{1024};
    bool                      warned_full = false;
    regex::PcreHeap           heap;     // all of PCRE2's memory (exec())
    pcre2_general_context    *gctx = nullptr;
    pcre2_compile_context    *cctx = nullptr;
    pcre2_match_context      *mctx = nullptr;
    pcre2_jit_stack          *jit_stack = nullptr;
    size_t                    jit_stack_max = kJitStackMaxDefault;
    uint32_t                  pcre_default_limit = 10000000;
    int                       buf_depth = 0;
    std::string               bufs[4];
    MemoSlot                  memo[kMemoSlots];
    ngx_int_t                 limit_conf = -2;   // limit last applied
    int                       serial = 0;
};

State &state()
{
    static State *s = [] {
        auto *st = new State;  // never destroyed: used until exit
        // Patterns, match data and contexts take their memory from the
        // heap that survives an abandoned match. On failure, PCRE2's
        // defaults (exec() then never jumps).
        st->gctx = pcre2_general_context_create(regex::PcreHeap::alloc,
                                                regex::PcreHeap::release,
                                                &st->heap);
        st->cctx = pcre2_compile_context_create(st->gctx);
        return st;
    }();
    return *s;
}

size_t memoSlot(const char *pat, uint32_t flags)
{
    auto h = reinterpret_cast<uintptr_t>(pat) >> 4;
    return (h ^ (h >> 7) ^ flags) & (kMemoSlots - 1);
}

void evictRegex(Regex *&re)
{
    for (MemoSlot &m : state().memo) {
        if (m.re == re) {
            m = MemoSlot{};
        }
    }
    re->cached = false;
    g_result.gen++;  // handles the FFI side remembered may be stale now
    if (re->refs == 0) {
        destroy(re);
    }
}

size_t cacheCapacity()
{
    MainConf *mcf = mainConf();
    if (mcf == nullptr || mcf->regex_cache_max_entries == NGX_CONF_UNSET) {
        return 1024;
    }
    return static_cast<size_t>(mcf->regex_cache_max_entries);
}

// The match context with the configured limit and the JIT stack.
pcre2_match_context *matchContext()
{
    State &s = state();
    if (s.mctx == nullptr) {
        s.mctx = pcre2_match_context_create(s.gctx);
        uint32_t def = 0;
        if (pcre2_config(PCRE2_CONFIG_MATCHLIMIT, &def) >= 0 && def > 0) {
            s.pcre_default_limit = def;
        }
        s.jit_stack = pcre2_jit_stack_create(kJitStackStart, s.jit_stack_max,
                                             nullptr);
        if (s.mctx && s.jit_stack) {
            pcre2_jit_stack_assign(s.mctx, nullptr, s.jit_stack);
        }
    }
    if (s.mctx == nullptr) {
        return nullptr;
    }
    MainConf *mcf = mainConf();
    ngx_int_t conf = mcf ? mcf->regex_match_limit : NGX_CONF_UNSET;
    if (conf != s.limit_conf) {
        uint32_t limit = kDefaultMatchLimit;
        if (conf != NGX_CONF_UNSET) {
            // 0 means "the PCRE library's default", as documented.
            limit = conf == 0 ? s.pcre_default_limit
                    : conf > static_cast<ngx_int_t>(UINT32_MAX)
                        ? UINT32_MAX : static_cast<uint32_t>(conf);
        }
        pcre2_set_match_limit(s.mctx, limit);
        s.limit_conf = conf;
    }
    return s.mctx;
}

uint32_t pcreCompileOptions(uint32_t flags)
{
    uint32_t o = 0;
    if (flags & regex::kAnchored) o |= PCRE2_ANCHORED;
    if (flags & regex::kCaseless) o |= PCRE2_CASELESS;
    if (flags & regex::kDupNames) o |= PCRE2_DUPNAMES;
    if (flags & regex::kMultiline) o |= PCRE2_MULTILINE;
    if (flags & regex::kDotAll) o |= PCRE2_DOTALL;
    if (flags & regex::kUtf) o |= PCRE2_UTF;
    if (flags & regex::kExtended) o |= PCRE2_EXTENDED;
    if (flags & regex::kJsCompat) {
        o |= PCRE2_ALT_BSUX | PCRE2_ALLOW_EMPTY_CLASS
             | PCRE2_MATCH_UNSET_BACKREF;
    }
    return o;
}

// lua-nginx-module reports exec failures with PCRE1's numbers (its docs
// promise "pcre_exec() failed: -8" for the match limit); the PCRE2 codes
// with a PCRE1 counterpart are translated, others pass through.
int pcre1Code(int rc)
{
    if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21) {
        return -10;                                 // PCRE_ERROR_BADUTF8
    }
    switch (rc) {
    case PCRE2_ERROR_PARTIAL: return -12;
    case PCRE2_ERROR_BADUTFOFFSET: return -11;
    case PCRE2_ERROR_MATCHLIMIT: return -8;
    case PCRE2_ERROR_DEPTHLIMIT: return -21;
    case PCRE2_ERROR_HEAPLIMIT: return -21;
    case PCRE2_ERROR_JIT_STACKLIMIT: return -27;
    case PCRE2_ERROR_NOMEMORY: return -6;
    case PCRE2_ERROR_DFA_WSSIZE: return -19;
    case PCRE2_ERROR_DFA_RECURSE: return -20;
    default: return rc;
    }
}

void pushExecError(lua_State *L, int rc)
{
    lua_pushfstring(L, "pcre_exec() failed: %d", pcre1Code(rc));
}

// ---- arguments ----

// The subject: lua-resty-core converts any value with tostring(), so a nil
// header value matches as "nil" rather than raising; we do the same.
const char *subjectArg(lua_State *L, int idx, size_t *len)
{
    if (lua_type(L, idx) == LUA_TSTRING) {
        return lua_tolstring(L, idx, len);
    }
    lua_getfield(L, LUA_REGISTRYINDEX, kToString);
    lua_pushvalue(L, idx);
    lua_call(L, 1, 1);
    if (!lua_isstring(L, -1)) {
        luaL_error(L, "'tostring' must return a string");
    }
    lua_replace(L, idx);
    return lua_tolstring(L, idx, len);
}

Options optionsArg(lua_State *L, int idx)
{
    Options o;
    if (lua_isnoneornil(L, idx)) {
        return o;
    }
    size_t len;
    const char *s = luaL_checklstring(L, idx, &len);
    char bad = 0;
    if (!regex::parseOptions(std::string_view(s, len), &o, &bad)) {
        luaL_error(L, "unknown flag \"%c\" (flags \"%s\")", bad, s);
    }
    return o;
}

// ctx.pos (1-based) as a 0-based start offset.
size_t startOffset(lua_State *L, int ctx)
{
    if (ctx == 0) {
        return 0;
    }
    lua_getfield(L, ctx, "pos");
    lua_Integer pos = lua_isnil(L, -1) ? 1 : luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    return pos <= 1 ? 0 : static_cast<size_t>(pos - 1);
}

int ctxArg(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx)) {
        return 0;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    return idx;
}

// ---- compiling ----

// Returns a referenced Regex, or nullptr with the error message pushed
// (nothing pushed when L is null: the FFI path then retries through the
// C API to report it).
Regex *compile(lua_State *L, const char *pat, size_t len, const Options &o)
{
    State &s = state();
    bool once = o.once;
    if (once) {
        size_t cap = cacheCapacity();
        if (cap != s.cache.capacity()) {
            s.cache.setCapacity(cap, evictRegex);
        }
        MemoSlot &m = s.memo[memoSlot(pat, o.flags)];
        Regex *re = m.re;
        if (re && m.pat == pat && re->flags == o.flags
            && re->lru->pattern.size() == len
            && std::memcmp(re->lru->pattern.data(), pat, len) == 0)
        {
            s.cache.touch(re->lru);
            re->refs++;
            return re;
        }
        auto h = s.cache.find(std::string_view(pat, len), o.flags);
        if (h != s.cache.end()) {
            s.cache.touch(h);
            re = h->value;
            m.pat = pat;
            m.re = re;
            re->refs++;
            return re;
        }
        once = cap > 0;
    }

    int errcode;
    PCRE2_SIZE erroff;
    pcre2_code *code = pcre2_compile(
        reinterpret_cast<PCRE2_SPTR>(pat), len, pcreCompileOptions(o.flags),
        &errcode, &erroff, s.cctx);
    if (code == nullptr) {
        if (L == nullptr) {
            return nullptr;
        }
        PCRE2_UCHAR msg[256];
        if (pcre2_get_error_message(errcode, msg, sizeof(msg)) < 0) {
            std::strcpy(reinterpret_cast<char *>(msg), "unknown error");
        }
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        luaL_addstring(&b, "pcre_compile() failed: ");
        luaL_addstring(&b, reinterpret_cast<char *>(msg));
        luaL_addstring(&b, " in \"");
        luaL_addlstring(&b, pat, len);
        luaL_addchar(&b, '"');
        if (erroff < len) {
            luaL_addstring(&b, " at \"");
            luaL_addlstring(&b, pat + erroff, len - erroff);
            luaL_addchar(&b, '"');
        }
        luaL_pushresult(&b);
        return nullptr;
    }
    if ((o.flags & regex::kJit) && !(o.flags & regex::kDfa)) {
        // Without JIT support the interpreter still gives correct results.
        pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    }

    Regex *re = new Regex;
    re->code = code;
    re->flags = o.flags;
    pcre2_pattern_info(code, PCRE2_INFO_CAPTURECOUNT, &re->ncap);
    uint32_t count = 0, entry = 0;
    PCRE2_SPTR table = nullptr;
    pcre2_pattern_info(code, PCRE2_INFO_NAMECOUNT, &count);
    if (count > 0) {
        pcre2_pattern_info(code, PCRE2_INFO_NAMEENTRYSIZE, &entry);
        pcre2_pattern_info(code, PCRE2_INFO_NAMETABLE, &table);
        re->names.reserve(count);
        for (uint32_t i = 0; i < count; i++) {
            PCRE2_SPTR e = table + i * entry;
            uint32_t group = (static_cast<uint32_t>(e[0]) << 8) | e[1];
            re->names.push_back(
                {std::string(reinterpret_cast<const char *>(e + 2)), group});
        }
    }
    re->md = pcre2_match_data_create_from_pattern(code, s.gctx);
    if (re->md == nullptr) {
        destroy(re);
        if (L) {
            lua_pushliteral(L, "no memory");
        }
        return nullptr;
    }
    re->refs = 1;
    if (once) {
        if (s.cache.size() >= s.cache.capacity() && !s.warned_full) {
            // Documented: one warning, the first time the limit is hit.
            s.warned_full = true;
            ngx_log_error(NGX_LOG_WARN, currentLog(), 0,
                          "lua exceeding regex cache max entries (%uz)",
                          s.cache.capacity());
        }
        re->cached = s.cache.put(std::string_view(pat, len), o.flags, re,
                                 evictRegex, &re->lru);
        if (re->cached) {
            s.memo[memoSlot(pat, o.flags)] = MemoSlot{pat, re};
            re->serial = ++s.serial;
        }
    }
    return re;
}

// ---- matching ----

// Where the budget's signal handler jumps to out of a match (exec()).
sigjmp_buf g_escape;
volatile sig_atomic_t g_escape_armed = 0;
volatile sig_atomic_t g_escape_signal = 0;  // blocked after the jump

// Budget's on_trip_signal: the run is out of CPU budget. Inside a pcre2
// call (and not in its allocator) leave the call; anywhere else the
// armed hook does the job at the next Lua instruction.
void escapeMatch(int sig)
{
    if (g_escape_armed && !state().heap.busy()) {
        g_escape_armed = 0;
        g_escape_signal = sig;
        siglongjmp(g_escape, 1);
    }
}

int runMatch(Regex *re, PCRE2_SPTR s, size_t len, size_t off, uint32_t opts,
             pcre2_match_context *mctx)
{
    if (re->flags & regex::kDfa) {
        int ws[512];
        int rc = pcre2_dfa_match(re->code, s, len, off, opts, re->md, mctx,
                                 ws, sizeof(ws) / sizeof(ws[0]));
        return rc == 0 ? 1 : rc;  // 0: more matches than ovector pairs
    }
    return pcre2_match(re->code, s, len, off, opts, re->md, mctx);
}

// A match the budget's signal handler may leave: returns false when it
// did. Only `rc` (written once the call returned) crosses the jump.
bool runEscapable(Regex *re, PCRE2_SPTR s, size_t len, size_t off,
                  uint32_t opts, pcre2_match_context *mctx, int *rc)
{
    // No signal mask saved: that would cost a system call per match.
    if (sigsetjmp(g_escape, 0) != 0) {
        return false;
    }
    g_escape_armed = 1;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    *rc = runMatch(re, s, len, off, opts, mctx);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    g_escape_armed = 0;
    return true;
}

// The match data of an abandoned match may point at freed frames: it
// goes (with what the match allocated), and the pattern gets a new one.
void abandonMatch(Regex *re)
{
    // The handler was left by a jump: its signal is still blocked.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, g_escape_signal);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);

    State &st = state();
    pcre2_match_data_free(re->md);
    st.heap.abandon();
    re->md = pcre2_match_data_create_from_pattern(re->code, st.gctx);
}

// One pcre2 run. `check_utf` is false for the follow-up runs of gsub and
// gmatch over a subject already validated by the first run.
int exec(Regex *re, const char *subj, size_t len, size_t off, bool check_utf)
{
    pcre2_match_context *mctx = matchContext();
    uint32_t opts = (!check_utf && (re->flags & regex::kUtf))
                        ? PCRE2_NO_UTF_CHECK : 0;
    auto *s = reinterpret_cast<PCRE2_SPTR>(subj);
    State &st = state();
    if (re->md == nullptr) {
        return PCRE2_ERROR_NOMEMORY;  // lost with an abandoned match
    }
    if (st.gctx == nullptr) {
        return runMatch(re, s, len, off, opts, mctx);
    }
    int rc = PCRE2_ERROR_MATCHLIMIT;
    st.heap.begin();
    if (runEscapable(re, s, len, off, opts, mctx, &rc)) {
        st.heap.end();
        return rc;
    }
    abandonMatch(re);
    return PCRE2_ERROR_MATCHLIMIT;  // the script ends at its next step
}

// Captures copied out of the match data, so building Lua values (which
// may run finalizers that use the same pattern) cannot disturb them.
struct Captures {
    size_t              inline_ov[2 * 16];
    std::vector<size_t> heap;
    size_t             *ov = inline_ov;
    uint32_t            n = 0;          // pairs: group 0..n-1

    void take(Regex *re, int rc)
    {
        uint32_t groups = (re->flags & regex::kDfa) ? 1 : re->ncap + 1;
        n = groups;
        if (groups > 16) {
            heap.resize(2 * groups);
            ov = heap.data();
        }
        const PCRE2_SIZE *src = pcre2_get_ovector_pointer(re->md);
        uint32_t have = static_cast<uint32_t>(rc);
        for (uint32_t i = 0; i < groups; i++) {
            if (i < have) {
                ov[2 * i] = src[2 * i];
                ov[2 * i + 1] = src[2 * i + 1];
            } else {
                ov[2 * i] = ov[2 * i + 1] = regex::kUnset;
            }
        }
    }
    size_t from() const { return ov[0]; }
    size_t to() const { return ov[1]; }
};

void pushGroup(lua_State *L, const char *subj, const Captures &c, uint32_t i)
{
    if (i >= c.n || c.ov[2 * i] == regex::kUnset
        || c.ov[2 * i + 1] < c.ov[2 * i]) {
        lua_pushboolean(L, 0);
        return;
    }
    lua_pushlstring(L, subj + c.ov[2 * i], c.ov[2 * i + 1] - c.ov[2 * i]);
}

// Fills the match table: [0..n] and named groups. `res` is the reusable
// table argument (0: create one). Leaves the table on the stack.
void pushMatch(lua_State *L, Regex *re, const char *subj, const Captures &c,
               int res)
{
    bool dfa = re->flags & regex::kDfa;
    uint32_t groups = c.n;
    if (res) {
        lua_pushvalue(L, res);
    } else {
        lua_createtable(L, static_cast<int>(groups - 1),
                        dfa ? 1 : static_cast<int>(re->names.size() + 1));
    }
    for (uint32_t i = 0; i < groups; i++) {
        pushGroup(L, subj, c, i);
        lua_rawseti(L, -2, static_cast<int>(i));
    }
    if (dfa || re->names.empty()) {
        return;
    }
    if (!(re->flags & regex::kDupNames)) {
        for (const Regex::Name &n : re->names) {
            lua_pushlstring(L, n.name.data(), n.name.size());
            pushGroup(L, subj, c, n.group);
            lua_rawset(L, -3);
        }
        return;
    }
    // "D": a name maps to the array of the values its groups matched; a
    // name none of whose groups matched is left out.
    size_t i = 0;
    while (i < re->names.size()) {
        size_t j = i;
        int k = 0;
        while (j < re->names.size()
               && re->names[j].name == re->names[i].name) {
            uint32_t g = re->names[j].group;
            if (g < c.n && c.ov[2 * g] != regex::kUnset) {
                if (k == 0) {
                    lua_pushlstring(L, re->names[i].name.data(),
                                    re->names[i].name.size());
                    lua_newtable(L);
                }
                pushGroup(L, subj, c, g);
                lua_rawseti(L, -2, ++k);
            }
            j++;
        }
        if (k > 0) {
            lua_rawset(L, -3);
        }
        i = j;
    }
}

// Next search offset after an empty match at `at`: one character on.
size_t stepOver(const Regex *re, const char *subj, size_t len, size_t at)
{
    size_t n = at + 1;
    if (re->flags & regex::kUtf) {
        while (n < len && (static_cast<unsigned char>(subj[n]) & 0xC0) == 0x80)
        {
            n++;
        }
    }
    return n;
}

// ---- ngx.re.match / ngx.re.find ----

// The failure returns of match and find: `nils` nils, then the message
// already on the stack.
int failWith(lua_State *L, int nils)
{
    for (int i = 0; i < nils; i++) {
        lua_pushnil(L);
        lua_insert(L, -2);
    }
    return nils + 1;
}

// One search from `off`, shared by match and find. Returns 0 when it
// matched (`*rc` as pcre2_match's), else the number of results pushed:
// nil when nothing matched, `nils` nils and the message on an error.
int searchOnce(lua_State *L, Regex *re, const char *subj, size_t len,
               size_t off, int nils, int *rc)
{
    if (off > len) {
        lua_pushnil(L);
        return 1;
    }
    *rc = exec(re, subj, len, off, true);
    if (*rc == PCRE2_ERROR_NOMATCH) {
        lua_pushnil(L);
        return 1;
    }
    if (*rc < 0) {
        pushExecError(L, *rc);
        return failWith(L, nils);
    }
    return 0;
}

int reMatch(lua_State *L)
{
    size_t len, plen;
    const char *subj = subjectArg(L, 1, &len);
    const char *pat = luaL_checklstring(L, 2, &plen);
    Options o = optionsArg(L, 3);
    int ctx = ctxArg(L, 4);
    int res = 0;
    if (!lua_isnoneornil(L, 5)) {
        luaL_checktype(L, 5, LUA_TTABLE);
        res = 5;
    }
    size_t off = startOffset(L, ctx);
    Regex *raw = compile(L, pat, plen, o);
    if (raw == nullptr) {
        return failWith(L, 1);
    }
    RegexRef re(raw);
    int rc;
    if (int n = searchOnce(L, raw, subj, len, off, 1, &rc)) {
        return n;
    }
    Captures c;
    c.take(raw, rc);
    if (ctx) {
        lua_pushinteger(L, static_cast<lua_Integer>(c.to() + 1));
        lua_setfield(L, ctx, "pos");
    }
    pushMatch(L, raw, subj, c, res);
    return 1;
}

int reFind(lua_State *L)
{
    size_t len, plen;
    const char *subj = subjectArg(L, 1, &len);
    const char *pat = luaL_checklstring(L, 2, &plen);
    Options o = optionsArg(L, 3);
    int ctx = ctxArg(L, 4);
    lua_Integer nth = luaL_optinteger(L, 5, 0);
    if (nth < 0) {
        nth = 0;
    }
    size_t off = startOffset(L, ctx);
    Regex *raw = compile(L, pat, plen, o);
    if (raw == nullptr) {
        return failWith(L, 2);
    }
    RegexRef re(raw);
    int rc;
    if (int n = searchOnce(L, raw, subj, len, off, 2, &rc)) {
        return n;
    }
    uint32_t groups = (raw->flags & regex::kDfa) ? 1 : raw->ncap + 1;
    if (static_cast<uint64_t>(nth) >= groups) {
        lua_pushliteral(L, "nth out of bound");
        return failWith(L, 2);
    }
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(raw->md);
    if (ctx) {
        lua_pushinteger(L, static_cast<lua_Integer>(ov[1] + 1));
        lua_setfield(L, ctx, "pos");
    }
    auto n = static_cast<uint32_t>(nth);
    if (n >= static_cast<uint32_t>(rc) || ov[2 * n] == PCRE2_UNSET) {
        lua_pushnil(L);
        lua_pushnil(L);
        return 2;
    }
    lua_pushinteger(L, static_cast<lua_Integer>(ov[2 * n] + 1));
    lua_pushinteger(L, static_cast<lua_Integer>(ov[2 * n + 1]));
    return 2;
}

// ---- ngx.re.gmatch ----

struct GmatchState {
    Regex   *re;
    size_t   off;
    bool     done;
    bool     checked;   // the subject passed the UTF-8 check
};

const char kGmatchMeta[] = "luaguard.re.gmatch";

int gmatchGc(lua_State *L)
{
    auto *st = static_cast<GmatchState *>(lua_touserdata(L, 1));
    if (st->re) {
        release(st->re);
        st->re = nullptr;
    }
    return 0;
}

int gmatchIter(lua_State *L)
{
    auto *st = static_cast<GmatchState *>(
        lua_touserdata(L, lua_upvalueindex(1)));
    size_t len;
    const char *subj = lua_tolstring(L, lua_upvalueindex(2), &len);
    if (st->done || st->re == nullptr || st->off > len) {
        lua_pushnil(L);
        return 1;
    }
    Regex *re = st->re;
    re->refs++;
    RegexRef hold(re);
    int rc = exec(re, subj, len, st->off, !st->checked);
    st->checked = true;
    if (rc < 0) {
        st->done = true;
        lua_pushnil(L);
        if (rc == PCRE2_ERROR_NOMATCH) {
            return 1;
        }
        pushExecError(L, rc);
        return 2;
    }
    Captures c;
    c.take(re, rc);
    if (c.to() == c.from()) {
        if (c.to() >= len) {
            st->done = true;
        }
        st->off = stepOver(re, subj, len, c.to());
    } else {
        st->off = c.to();
    }
    pushMatch(L, re, subj, c, 0);
    return 1;
}

int reGmatch(lua_State *L)
{
    size_t len, plen;
    subjectArg(L, 1, &len);
    const char *pat = luaL_checklstring(L, 2, &plen);
    Options o = optionsArg(L, 3);
    auto *st = static_cast<GmatchState *>(
        lua_newuserdata(L, sizeof(GmatchState)));
    *st = GmatchState{nullptr, 0, false, false};
    luaL_getmetatable(L, kGmatchMeta);
    lua_setmetatable(L, -2);
    Regex *re = compile(L, pat, plen, o);
    if (re == nullptr) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    st->re = re;  // the reference now belongs to the iterator
    lua_pushvalue(L, 1);
    lua_pushcclosure(L, gmatchIter, 2);
    return 1;
}

// ---- ngx.re.sub / ngx.re.gsub ----

// A string buffer per nesting level (a replacement callback may call gsub
// again), reused across calls so gsub does not allocate each time.
class OutBuf {
 public:
    OutBuf()
    {
        State &s = state();
        depth_ = s.buf_depth++;
        buf_ = depth_ < 4 ? &s.bufs[depth_] : &own_;
        buf_->clear();
    }
    ~OutBuf()
    {
        State &s = state();
        s.buf_depth--;
        if (buf_->capacity() > 64 * 1024) {
            std::string().swap(*buf_);  // don't pin a huge buffer
        }
    }
    OutBuf(const OutBuf &) = delete;
    OutBuf &operator=(const OutBuf &) = delete;
    std::string &operator*() { return *buf_; }
    std::string *operator->() { return buf_; }

 private:
    int          depth_;
    std::string *buf_;
    std::string  own_;
};

// Appends a replacement callback's return value as lua-resty-core does:
// strings and numbers as they are, anything else through tostring().
void appendValue(lua_State *L, std::string *out)
{
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER) {
        lua_getfield(L, LUA_REGISTRYINDEX, kToString);
        lua_insert(L, -2);
        lua_call(L, 1, 1);
    }
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    if (s) {
        out->append(s, n);
    }
    lua_pop(L, 1);
}

// The replacement template for `src`, memoized on a cached pattern;
// nullptr when the template is invalid.
const ReplTemplate *templateFor(Regex *re, std::string_view src,
                                ReplTemplate *local)
{
    if (re->cached && re->tpl_ok && re->tpl_src == src) {
        return &re->tpl;
    }
    ReplTemplate *dst = re->cached ? &re->tpl : local;
    re->tpl_ok = false;
    std::string err;
    if (!dst->compile(src, &err)) {
        // lua-nginx-module logs why, on the cycle's log; the template is
        // the script's text: escaped.
        std::string line;
        appendLogEscaped(line, err.data(), err.size());
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0, "%s", line.c_str());
        return nullptr;
    }
    if (re->cached) {
        re->tpl_src.assign(src);
        re->tpl_ok = true;
    }
    return dst;
}

// The sub/gsub loop: copies the subject to `out` with each match replaced
// by what `repl(captures, out)` appends. Returns the number of matches or
// a negative pcre2 error. An empty match replaces nothing itself: the
// search goes on one character later.
template <class Repl>
int substituteLoop(Regex *re, const char *subj, size_t len, bool global,
                   std::string *out, Repl repl)
{
    size_t off = 0, copied = 0;
    int count = 0;
    bool check = true;
    Captures c;
    while (off <= len) {
        int rc = exec(re, subj, len, off, check);
        check = false;
        if (rc == PCRE2_ERROR_NOMATCH) {
            break;
        }
        if (rc < 0) {
            return rc;
        }
        c.take(re, rc);
        size_t from = c.from(), to = c.to();
        out->append(subj + copied, from - copied);
        repl(c, out);
        count++;
        copied = to;
        if ((count & 1023) == 0 && budget::Guard::instance().overdue()) {
            return PCRE2_ERROR_MATCHLIMIT;  // many cheap matches, long scan
        }
        if (!global) {
            break;
        }
        if (to == from) {
            if (to >= len) {
                break;
            }
            off = stepOver(re, subj, len, to);
            out->append(subj + to, off - to);
            copied = off;
        } else {
            off = to;
        }
    }
    if (count > 0) {
        out->append(subj + copied, len - copied);
    }
    return count;
}

void expandInto(const ReplTemplate *tpl, const char *subj, const Captures &c,
                std::string *out)
{
    if (tpl->literal()) {
        out->append(tpl->text());
    } else {
        tpl->expand(subj, c.ov, c.n, out);
    }
}

int substitute(lua_State *L, bool global)
{
    size_t len, plen;
    const char *subj = subjectArg(L, 1, &len);
    const char *pat = luaL_checklstring(L, 2, &plen);
    Options o = optionsArg(L, 4);
    bool func = lua_type(L, 3) == LUA_TFUNCTION;
    if (!func && lua_type(L, 3) != LUA_TSTRING) {
        size_t rlen;
        subjectArg(L, 3, &rlen);  // tostring() it, as the reference does
    }

    Regex *raw = compile(L, pat, plen, o);
    if (raw == nullptr) {
        lua_pushnil(L);
        lua_pushnil(L);
        lua_pushvalue(L, -3);
        return 3;
    }
    RegexRef re(raw);

    const ReplTemplate *tpl = nullptr;
    ReplTemplate local;
    if (!func) {
        size_t tlen;
        const char *t = lua_tolstring(L, 3, &tlen);
        tpl = templateFor(raw, std::string_view(t, tlen), &local);
        if (tpl == nullptr) {
            lua_pushnil(L);
            lua_pushnil(L);
            lua_pushliteral(L, "failed to compile the replacement template");
            return 3;
        }
    }

    OutBuf out;
    int count;
    if (func) {
        count = substituteLoop(raw, subj, len, global, &*out,
            [L, raw, subj](const Captures &c, std::string *o) {
                lua_pushvalue(L, 3);
                pushMatch(L, raw, subj, c, 0);
                lua_call(L, 1, 1);
                appendValue(L, o);
            });
    } else {
        count = substituteLoop(raw, subj, len, global, &*out,
            [tpl, subj](const Captures &c, std::string *o) {
                expandInto(tpl, subj, c, o);
            });
    }
    if (count < 0) {
        lua_pushnil(L);
        lua_pushnil(L);
        pushExecError(L, count);
        return 3;
    }
    if (count == 0) {
        lua_pushvalue(L, 1);
        lua_pushinteger(L, 0);
        return 2;
    }
    lua_pushlstring(L, out->data(), out->size());
    lua_pushinteger(L, count);
    return 2;
}

int reSub(lua_State *L)
{
    return substitute(L, false);
}

int reGsub(lua_State *L)
{
    return substitute(L, true);
}


// Perl's split: a field ends where the pattern matches; an empty match at
// the start of a field does not end it; groups that matched are inserted
// between fields; trailing empty fields go unless `max` > 0 is given.
// Appends (start, end) offset pairs of the fields to `fields`; returns 0
// or a negative pcre2 error.
int splitFields(Regex *re, const char *subj, size_t len, size_t start,
                int64_t max, std::vector<size_t> *fields)
{
    if (start > len) {
        start = len;
    }
    size_t piece = start, off = start;
    int64_t n = 0;
    bool check = true;
    Captures c;
    while (off < len && (max <= 0 || n < max - 1)) {
        int rc = exec(re, subj, len, off, check);
        check = false;
        if (rc == PCRE2_ERROR_NOMATCH) {
            break;
        }
        if (rc < 0) {
            return rc;
        }
        c.take(re, rc);
        size_t from = c.from(), to = c.to();
        if (to == from) {
            if (from >= len) {
                break;
            }
            if (from == piece) {
                off = stepOver(re, subj, len, from);
                continue;
            }
        }
        fields->push_back(piece);
        fields->push_back(from);
        n++;
        if ((n & 1023) == 0 && budget::Guard::instance().overdue()) {
            return PCRE2_ERROR_MATCHLIMIT;
        }
        for (uint32_t g = 1; g < c.n; g++) {
            if (c.ov[2 * g] != regex::kUnset) {
                fields->push_back(c.ov[2 * g]);
                fields->push_back(c.ov[2 * g + 1]);
            }
        }
        piece = to;
        off = to == from ? stepOver(re, subj, len, to) : to;
    }
    fields->push_back(piece);
    fields->push_back(len);
    if (max <= 0) {
        while (!fields->empty()
               && (*fields)[fields->size() - 1]
                      == (*fields)[fields->size() - 2]) {
            fields->resize(fields->size() - 2);
        }
    }
    return 0;
}

// ---- the FFI fast path ----
//
// Calls from Lua into lua_CFunctions cannot be JIT-compiled, so
// ngx.re.match and ngx.re.find are Lua functions (lua/regex_ffi.lua) that
// call luaguard_re_exec() through the FFI and build their results in
// JIT-compiled Lua. Anything unusual (non-string arguments, a compile
// error, an unknown option) goes to the C API functions above, which
// produce the exact errors.

constexpr int kFallback = -1000;
constexpr int kBadTemplate = -1001;

std::vector<int> g_ov;
Regex *g_last = nullptr;    // keeps the result's pattern alive
std::string g_out;          // luaguard_re_subst's result buffer

// The pattern for an FFI call: `hint`, a cached pattern the Lua side
// remembered (valid while no eviction happened, which it checks through
// `gen`), or the pattern compiled / found from its text. Referenced;
// nullptr when the C API must take over (bad options, compile error).
Regex *ffiRegex(Regex *hint, const char *pat, size_t plen, const char *opts,
                size_t olen)
{
    Regex *re = hint;
    if (re) {
        state().cache.touch(re->lru);
        re->refs++;
    } else {
        Options o;
        char bad;
        if (!regex::parseOptions(std::string_view(opts, olen), &o, &bad)) {
            return nullptr;
        }
        re = compile(nullptr, pat, plen, o);
        if (re == nullptr) {
            return nullptr;
        }
    }
    bool dfa = re->flags & regex::kDfa;
    g_result.re = re;
    g_result.serial = re->cached ? re->serial : 0;
    g_result.ncap = dfa ? 0 : static_cast<int>(re->ncap);
    g_result.nnames = dfa ? 0 : static_cast<int>(re->names.size());
    g_result.dupnames = (re->flags & regex::kDupNames) ? 1 : 0;
    g_result.utf = (re->flags & regex::kUtf) ? 1 : 0;
    return re;
}

}  // namespace

extern "C" LUAGUARD_FFI_EXPORT
luaguard_re_result_t *luaguard_re_result(void)
{
    return &g_result;
}

extern "C" LUAGUARD_FFI_EXPORT
int luaguard_re_exec(void *hint, const char *pat, size_t plen,
                     const char *opts, size_t olen, const char *subj,
                     size_t len, size_t off, int no_utf_check)
{
    if (len > INT32_MAX) {
        return kFallback;  // offsets travel as int
    }
    Regex *re = ffiRegex(static_cast<Regex *>(hint), pat, plen, opts, olen);
    if (re == nullptr) {
        return kFallback;
    }
    if (g_last) {
        release(g_last);
    }
    g_last = re;  // our reference moves here: names stay readable
    if (off > len) {
        return PCRE2_ERROR_NOMATCH;
    }
    int rc = exec(re, subj, len, off, !no_utf_check);
    if (rc < 0) {
        return rc == PCRE2_ERROR_NOMATCH ? rc : pcre1Code(rc);
    }
    auto groups = static_cast<uint32_t>(g_result.ncap + 1);
    if (g_ov.size() < 2 * groups) {
        g_ov.resize(2 * groups);
    }
    const PCRE2_SIZE *src = pcre2_get_ovector_pointer(re->md);
    auto have = static_cast<uint32_t>(rc);
    for (uint32_t i = 0; i < groups; i++) {
        if (i < have && src[2 * i] != PCRE2_UNSET) {
            g_ov[2 * i] = static_cast<int>(src[2 * i]);
            g_ov[2 * i + 1] = static_cast<int>(src[2 * i + 1]);
        } else {
            g_ov[2 * i] = g_ov[2 * i + 1] = -1;
        }
    }
    g_result.ov = g_ov.data();
    return rc;
}

// sub/gsub with a string template: no Lua runs in between, so one static
// buffer serves. Returns the count, or kBadTemplate, kFallback or a
// (PCRE1-numbered) exec error.
extern "C" LUAGUARD_FFI_EXPORT
int luaguard_re_subst(void *hint, const char *pat, size_t plen,
                      const char *opts, size_t olen, const char *subj,
                      size_t len, const char *tpl, size_t tlen, int global)
{
    Regex *raw = ffiRegex(static_cast<Regex *>(hint), pat, plen, opts, olen);
    if (raw == nullptr) {
        return kFallback;
    }
    RegexRef re(raw);
    ReplTemplate local;
    const ReplTemplate *t = templateFor(raw, std::string_view(tpl, tlen),
                                        &local);
    if (t == nullptr) {
        return kBadTemplate;
    }
    if (g_out.capacity() > 1024 * 1024) {
        std::string().swap(g_out);  // the last result was copied out
    }
    g_out.clear();
    int count = substituteLoop(raw, subj, len, global != 0, &g_out,
        [t, subj](const Captures &c, std::string *out) {
            expandInto(t, subj, c, out);
        });
    if (count < 0) {
        return pcre1Code(count);
    }
    g_result.out = g_out.data();
    g_result.outlen = g_out.size();
    return count;
}

// split: the fields' offsets go to the result's ov as (start, end)
// pairs. Returns the number of fields, or kFallback or an exec error.
extern "C" LUAGUARD_FFI_EXPORT
int luaguard_re_split(void *hint, const char *pat, size_t plen,
                      const char *opts, size_t olen, const char *subj,
                      size_t len, size_t pos, int64_t max)
{
    if (len > INT32_MAX) {
        return kFallback;
    }
    Regex *raw = ffiRegex(static_cast<Regex *>(hint), pat, plen, opts, olen);
    if (raw == nullptr) {
        return kFallback;
    }
    RegexRef re(raw);
    static std::vector<size_t> fields;
    fields.clear();
    int rc = splitFields(raw, subj, len, pos, max, &fields);
    if (rc < 0) {
        return pcre1Code(rc);
    }
    if (g_ov.size() < fields.size()) {
        g_ov.resize(fields.size());
    }
    for (size_t i = 0; i < fields.size(); i++) {
        g_ov[i] = static_cast<int>(fields[i]);
    }
    g_result.ov = g_ov.data();
    return static_cast<int>(fields.size() / 2);
}

extern "C" LUAGUARD_FFI_EXPORT
const char *luaguard_re_name(void *p, int i, int *group)
{
    auto *re = static_cast<Regex *>(p);
    if (re == nullptr || i < 0 || static_cast<size_t>(i) >= re->names.size())
    {
        return nullptr;
    }
    *group = static_cast<int>(re->names[i].group);
    return re->names[i].name.c_str();
}

namespace {



// ---- require "ngx.re": split, opt ----

// Clears what a reused result table held beyond its first n entries.
void clearTail(lua_State *L, int t, int n)
{
    for (int i = n + 1;; i++) {
        lua_rawgeti(L, t, i);
        bool end = lua_isnil(L, -1);
        lua_pop(L, 1);
        if (end) {
            break;
        }
        lua_pushnil(L);
        lua_rawseti(L, t, i);
    }
}

int reSplit(lua_State *L)
{
    size_t len, plen;
    const char *subj = subjectArg(L, 1, &len);
    const char *pat = luaL_checklstring(L, 2, &plen);
    Options o = optionsArg(L, 3);
    int ctx = ctxArg(L, 4);
    lua_Integer max = 0;
    if (!lua_isnoneornil(L, 5)) {
        max = luaL_checkinteger(L, 5);
    }
    int res = 0;
    if (!lua_isnoneornil(L, 6)) {
        if (!lua_istable(L, 6)) {
            return luaL_error(L, "res is not a table");
        }
        res = 6;
    }
    size_t start = startOffset(L, ctx);
    Regex *raw = compile(L, pat, plen, o);
    if (raw == nullptr) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    RegexRef re(raw);
    std::vector<size_t> fields;
    int rc = splitFields(raw, subj, len, start, max, &fields);
    if (rc < 0) {
        lua_pushnil(L);
        pushExecError(L, rc);
        return 2;
    }
    if (res) {
        lua_pushvalue(L, res);
    } else {
        lua_createtable(L, static_cast<int>(fields.size() / 2), 0);
    }
    int t = lua_gettop(L);
    int n = 0;
    for (size_t i = 0; i < fields.size(); i += 2) {
        lua_pushlstring(L, subj + fields[i], fields[i + 1] - fields[i]);
        lua_rawseti(L, t, ++n);
    }
    if (res) {
        clearTail(L, t, n);
    }
    return 1;
}

int reOpt(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    if (std::strcmp(name, "jit_stack_size") != 0) {
        return luaL_error(L, "unrecognized option name");
    }
    lua_Integer size = luaL_checkinteger(L, 2);
    if (size <= 0) {
        return luaL_error(L, "bad jit_stack_size: %d", static_cast<int>(size));
    }
    State &s = state();
    matchContext();  // make sure the context exists
    auto max = static_cast<size_t>(size);
    pcre2_jit_stack *stack = pcre2_jit_stack_create(
        max < kJitStackStart ? max : kJitStackStart, max, nullptr);
    if (stack == nullptr) {
        return luaL_error(L, "pcre2_jit_stack_create() failed");
    }
    if (s.jit_stack) {
        pcre2_jit_stack_free(s.jit_stack);
    }
    s.jit_stack = stack;
    s.jit_stack_max = max;
    if (s.mctx) {
        pcre2_jit_stack_assign(s.mctx, nullptr, stack);
    }
    return 0;
}

int loadNgxRe(lua_State *L)
{
    const luaL_Reg fns[] = {{"split", reSplit},
                            {"opt", reOpt},
                            {nullptr, nullptr}};
    pushRestyModule(L, fns);
    return 1;
}

}  // namespace

bool regexCacheEmpty()
{
    return state().cache.size() == 0;
}

bool openRegex(lua_State *L, std::string *err)
{
    budget::Guard::instance().on_trip_signal = escapeMatch;
    // In each VM's registry (lua_vm, and a reload makes new VMs).
    lua_getglobal(L, "tostring");
    lua_setfield(L, LUA_REGISTRYINDEX, kToString);
    luaL_newmetatable(L, kGmatchMeta);
    lua_pushcfunction(L, gmatchGc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    subTable(L, "re");
    const luaL_Reg fns[] = {{"match", reMatch},
                            {"find", reFind},
                            {"gmatch", reGmatch},
                            {"sub", reSub},
                            {"gsub", reGsub},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
    lua_pop(L, 1);

    preload(L, "ngx.re", loadNgxRe);

    // The FFI versions replace the functions above, which stay as their
    // fallbacks for what the fast path hands back. A failure here is a
    // start-up error: silently serving through the slow path would hide a
    // broken build.
    lua_setglobal(L, "ngx");  // the chunk reaches `ngx` as a global
    lua_pushstring(L, kRegexCdef);
    lua_pushcfunction(L, reMatch);
    lua_pushcfunction(L, reFind);
    lua_pushcfunction(L, reGmatch);
    lua_pushcfunction(L, reSub);
    lua_pushcfunction(L, reGsub);
    bool ok = runEmbedded(L, kLua_regex_ffi, kLua_regex_ffi_len,
                          "=luaguard.regex", 6, 0, err);
    lua_getglobal(L, "ngx");
    return ok;
}

}  // namespace luaguard::api
