/*
 * checkhook_test.c - self-test for the LuaJIT built by scripts/build-luajit.sh
 *
 * Verifies that the static libluajit-5.1.a was built with
 * -DLUAJIT_ENABLE_CHECKHOOK: an instruction-count hook installed
 * asynchronously (from a SIGALRM handler, the way luaguard interrupts a
 * runaway request) must interrupt even loops that are running inside
 * JIT-compiled traces.  Without CHECKHOOK, compiled loops never look at the
 * hook mask and the first cases below spin forever (the watchdog then fails
 * the test).
 *
 * Compiled loops do not test the hook mask at every iteration (the
 * loop-hook-exit patch of scripts/luajit-patches): the signal handler also
 * calls luaguard_jit_interrupt(), which points the running loop's back edge
 * at the exit of the omitted test, and the hook takes that back with
 * luaguard_jit_interrupt_end(). The cases check that every loop shape is
 * stopped, that the patched exit restores the loop's exact state (a loop
 * interrupted hundreds of times by a hook that lets it go on computes the
 * same result), and that a state with luaguard_jit_hookreal() keeps the
 * test in its loops.
 *
 * Also checks that jit.status() reports the JIT as on and that the FFI works.
 *
 * Build (done by `scripts/build-luajit.sh --selftest OUTDIR`):
 *   cc -O2 -I OUTDIR/include/luajit-2.1 checkhook_test.c \
 *      OUTDIR/lib/libluajit-5.1.a -Wl,-E -lm -ldl
 *
 * Output: one PASS/FAIL line per check, exit status 0 iff everything passed.
 */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"
#include "luajit.h"

#define INTERRUPT_USEC 100000 /* SIGALRM after 100 ms (one-shot) */
#define WATCHDOG_SEC 10       /* CPU-time limit per case (SIGVTALRM) */

static lua_State *volatile g_L;
static volatile sig_atomic_t g_case_no;
static volatile sig_atomic_t g_patched; /* interrupts that patched a loop */
static volatile sig_atomic_t g_resumes; /* hook calls that let the loop go */
static int g_failures;

/* Count hook: raise an error.  Deliberately does NOT remove itself, so a
 * pcall() inside the script cannot swallow the interrupt for good: the next
 * instruction executed after the pcall returns fires the hook again. */
static void budget_hook(lua_State *L, lua_Debug *ar)
{
  (void)ar;
  luaguard_jit_interrupt_end();
  luaL_error(L, "budget");
}

/* A hook that lets the run go on: the loop left its trace through the
 * patched exit and must continue from exactly where it was. */
static void resume_hook(lua_State *L, lua_Debug *ar)
{
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaguard_jit_interrupt_end();
  g_resumes++;
}

static lua_Hook volatile g_hook = budget_hook;

/* SIGALRM: lua_sethook() is the one Lua API call that may be used
 * asynchronously (see luajit.c's Ctrl-C handler). */
static void on_alarm(int sig)
{
  (void)sig;
  lua_sethook(g_L, g_hook, LUA_MASKCOUNT, 1);
  if (luaguard_jit_interrupt(g_L))
    g_patched++;
}

/* Watchdog: the interrupt never took effect. */
static void on_watchdog(int sig)
{
  static const char msg[] = "FAIL: watchdog expired, the hook never "
                            "interrupted the running code (CHECKHOOK missing?)\n";
  ssize_t r;
  (void)sig;
  r = write(STDOUT_FILENO, msg, sizeof(msg) - 1);
  (void)r;
  _exit(3);
}

static void set_timer(int which, long sec, long usec)
{
  struct itimerval it;
  memset(&it, 0, sizeof(it));
  it.it_value.tv_sec = sec;
  it.it_value.tv_usec = usec;
  if (setitimer(which, &it, NULL) != 0) {
    perror("setitimer");
    exit(2);
  }
}

static double now_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void result(int ok, const char *name, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

#include <stdarg.h>
static void result(int ok, const char *name, const char *fmt, ...)
{
  va_list ap;
  printf("%s: %s", ok ? "PASS" : "FAIL", name);
  if (fmt && *fmt) {
    printf(" (");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf(")");
  }
  printf("\n");
  fflush(stdout);
  if (!ok)
    g_failures++;
}

/* Run a chunk without any interrupt; leaves its results on the stack.
 * Returns 0 on success, prints and returns non-zero on error. */
static int run_plain(lua_State *L, const char *name, const char *code)
{
  lua_settop(L, 0);
  if (luaL_loadbuffer(L, code, strlen(code), name) != 0 ||
      lua_pcall(L, 0, LUA_MULTRET, 0) != 0) {
    result(0, name, "error: %s", lua_tostring(L, -1));
    lua_settop(L, 0);
    return 1;
  }
  return 0;
}

/* Number of traces currently held by the JIT compiler. */
static int count_traces(lua_State *L)
{
  int n = 0;
  if (run_plain(L, "count_traces",
                "local info = require('jit.util').traceinfo\n"
                "local n = 0\n"
                "for i = 1, 65535 do if info(i) then n = n + 1 end end\n"
                "return n") == 0)
    n = (int)lua_tointeger(L, 1);
  lua_settop(L, 0);
  return n;
}

/* Leaves the case's chunk alone on the stack; reports it if it does not
 * compile. */
static int load_case(lua_State *L, const char *name, const char *code)
{
  lua_settop(L, 0);
  if (luaL_loadbuffer(L, code, strlen(code), "=case") != 0) {
    result(0, name, "does not compile: %s", lua_tostring(L, -1));
    lua_settop(L, 0);
    return 0;
  }
  return 1;
}

/* want_patch: the loop must have been stopped through its patched back
 * edge (1), through the hook test it kept (0), either (-1). */
static void run_interrupt_case(lua_State *L, const char *code, int want_patch)
{
  char name[160];
  double t0, dt;
  int status, traces;
  const char *msg;

  g_case_no++;
  snprintf(name, sizeof(name), "interrupt #%d [%s]", (int)g_case_no, code);

  lua_settop(L, 0);
  lua_sethook(L, NULL, 0, 0);
  run_plain(L, "flush", "jit.flush()");
  if (!load_case(L, name, code))
    return;

  g_patched = 0;
  set_timer(ITIMER_VIRTUAL, WATCHDOG_SEC, 0);
  set_timer(ITIMER_REAL, 0, INTERRUPT_USEC);
  t0 = now_ms();
  status = lua_pcall(L, 0, 0, 0);
  dt = now_ms() - t0;
  set_timer(ITIMER_REAL, 0, 0);
  set_timer(ITIMER_VIRTUAL, 0, 0);
  lua_sethook(L, NULL, 0, 0); /* disarm before running anything else */

  msg = lua_tostring(L, -1);
  if (!msg)
    msg = "(non-string error)";
  traces = count_traces(L);

  if (status == 0) {
    result(0, name, "lua_pcall returned 0 after %.0f ms", dt);
  } else if (strstr(msg, "budget") == NULL) {
    result(0, name, "unexpected error %d: %s", status, msg);
  } else if (traces == 0) {
    /* The loop never ran as compiled code, so CHECKHOOK was not exercised. */
    result(0, name, "interrupted after %.0f ms, but no trace was compiled: %s",
           dt, msg);
  } else if (want_patch >= 0 && (g_patched > 0) != want_patch) {
    result(0, name, "interrupted after %.0f ms, %s", dt,
           want_patch ? "but not through a patched loop"
                      : "through a patched loop that should keep its test");
  } else {
    result(1, name, "interrupted after %.0f ms, %d trace(s), %s: %s", dt,
           traces, g_patched ? "loop patched" : "hook test", msg);
  }
  lua_settop(L, 0);
}

/* Sums computed by loops that are interrupted every 1 ms by a hook that lets
 * them go on: each interrupt leaves the trace through the patched exit. */
static void run_resume_case(lua_State *L, const char *code)
{
  char name[200];
  struct itimerval it;
  double got, want;

  g_case_no++;
  snprintf(name, sizeof(name), "resume #%d [%s]", (int)g_case_no, code);
  /* The interpreter's result, without interrupts, is the oracle. */
  lua_settop(L, 0);
  run_plain(L, "jit.off", "jit.off()");
  if (run_plain(L, name, code) != 0) {
    run_plain(L, "jit.on", "jit.on()");
    return;
  }
  want = lua_tonumber(L, 1);
  /* No side traces at the patched exits: one attached there while a back
   * edge pointed at it would take the back edge over, and hide a patch
   * that was not taken back from the check below. */
  run_plain(L, "jit.on", "jit.on() jit.flush() jit.opt.start('hotexit=1000')");
  if (!load_case(L, name, code))
    return;
  lua_pushvalue(L, -1);  /* run again below, on the same traces */
  g_hook = resume_hook;
  g_patched = g_resumes = 0;
  memset(&it, 0, sizeof(it));
  it.it_value.tv_usec = it.it_interval.tv_usec = 1000;
  set_timer(ITIMER_VIRTUAL, WATCHDOG_SEC, 0);
  setitimer(ITIMER_REAL, &it, NULL);
  if (lua_pcall(L, 0, 1, 0) != 0) {
    set_timer(ITIMER_REAL, 0, 0);
    result(0, name, "error: %s", lua_tostring(L, -1));
  } else {
    set_timer(ITIMER_REAL, 0, 0);
    got = lua_tonumber(L, -1);
    if (got != want)
      result(0, name, "got %.17g, want %.17g after %d patched exits", got,
             want, (int)g_patched);
    else if (g_patched < 10)
      result(0, name, "only %d patched exits: the case does not test them",
             (int)g_patched);
    else
      result(1, name, "%d patched exits, %d resumes, result exact",
             (int)g_patched, (int)g_resumes);
  }
  set_timer(ITIMER_VIRTUAL, 0, 0);
  lua_sethook(L, NULL, 0, 0);
  luaguard_jit_interrupt_end();
  g_hook = budget_hook;
  lua_settop(L, 1);
  /* The hook took every patch back: run uninterrupted on the same traces,
   * the loop leaves them where its code does (an inner loop once per outer
   * iteration), not at every iteration as through a back edge left patched
   * (with luaguard_jit_interrupt_end a no-op, the watchdog ends the test). */
  g_case_no++;
  snprintf(name, sizeof(name), "restored #%d", (int)g_case_no);
  lua_setglobal(L, "g_case_fn");
  set_timer(ITIMER_VIRTUAL, WATCHDOG_SEC, 0);
  if (run_plain(L, name, "local n = 0 local function count() n = n + 1 end "
                "jit.attach(count, 'texit') local r = g_case_fn() "
                "jit.attach(count) g_case_fn = nil return r, n") == 0) {
    got = lua_tonumber(L, 1);
    result(got == want && lua_tonumber(L, 2) < 100000, name,
           "%.0f trace exits, result %s", lua_tonumber(L, 2),
           got == want ? "exact" : "wrong");
  }
  set_timer(ITIMER_VIRTUAL, 0, 0);
  lua_settop(L, 0);
  run_plain(L, "hotexit", "jit.opt.start('hotexit=10')");
  lua_settop(L, 0);
}

int main(void)
{
  static const struct { const char *code; int patch; } cases[] = {
    { "while true do end", 1 },
    { "local i=0 while true do i=i+1 end", 1 },
    { "local function f(x) return x+1 end local i=0 while true do i=f(i) end",
      1 },
    { "while true do pcall(function() local i=0 while true do i=i+1 end end) "
      "end", 1 },
    /* A floating-point loop condition: two back edges (jp and jcc). */
    { "local x=1.5 while x > 0 do x = x + 0.25 end", 1 },
    { "for i = 1, math.huge do end", 1 },
    { "local s = 0 repeat s = (s + 7) % 13 until false", 1 },
    /* A branch inside the loop: a side trace links back to the root. */
    { "local i = 0 while true do i = i + 1 if i % 3 == 0 then i = i + 2 "
      "end end", -1 },
    /* Nested loops, the inner one compiled first. */
    { "local s = 0 while true do for j = 1, 100 do s = s + j end end", -1 },
    /* Allocating loops: their GC check keeps the hook test. */
    { "while true do local t = {} end", -1 },
    { "local s = '' while true do s = ('x'):rep(10) .. s:sub(1, 20) end", -1 },
    /* ITERN loops. */
    { "local t = {} for i = 1, 100 do t['k'..i] = i end "
      "local s = 0 while true do for k, v in pairs(t) do s = s + v end end",
      -1 },
    { "local t = {} for i = 1, 100 do t[i] = i end local s = 0 "
      "while true do for _, v in ipairs(t) do s = s + v end end", -1 },
    /* In a coroutine. */
    { "coroutine.wrap(function() local i = 0 while true do i = i + 1 end "
      "end)()", 1 },
  };
  /* Loops with several values carried around the loop, integer and float,
   * a float condition, a table written in the loop, nested loops. */
  static const char *const resume_cases[] = {
    "local a, b = 0, 0 for i = 1, 30000000 do a = a + i b = b + 2 * i end "
    "return a + b",
    "local x, n = 0, 0 for i = 1, 30000000 do "
    "x = bit.bxor(x, bit.band(i * 2654435761, 0x7fffffff)) n = n + 1 end "
    "return x + n",
    "local x, n = 1.0, 0 while x < 3e7 do x = x + 1.5 n = n + 1 end "
    "return x * 7 + n",
    "local t = {0, 0, 0} for i = 1, 30000000 do local k = i % 3 + 1 "
    "t[k] = t[k] + i end return t[1] * 3 + t[2] * 5 + t[3]",
    "local s = 0 for r = 1, 3000 do for i = 1, 10000 do s = (s + i * r) % 1000003 "
    "end end return s",
  };
  struct sigaction sa;
  lua_State *L;
  size_t i;

  setvbuf(stdout, NULL, _IOLBF, 0);

  L = luaL_newstate();
  if (!L) {
    printf("FAIL: luaL_newstate() returned NULL\n");
    return 1;
  }
  luaL_openlibs(L);
  g_L = L;

  memset(&sa, 0, sizeof(sa));
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sa.sa_handler = on_alarm;
  sigaction(SIGALRM, &sa, NULL);
  sa.sa_handler = on_watchdog;
  sigaction(SIGVTALRM, &sa, NULL);

  /* jit.status() must report the JIT compiler as on. */
  if (run_plain(L, "jit.status",
                "local t = { jit.status() }\n"
                "local flags = {}\n"
                "for i = 2, #t do flags[#flags + 1] = tostring(t[i]) end\n"
                "return t[1], jit.version .. ' ' .. jit.arch .. ': ' .. "
                "table.concat(flags, ' ')") == 0) {
    result(lua_toboolean(L, 1), "jit.status() reports the JIT on", "%s",
           lua_tostring(L, 2));
  }
  lua_settop(L, 0);

  /* The FFI must load and be able to call into libc. */
  if (run_plain(L, "ffi",
                "local ffi = require('ffi')\n"
                "ffi.cdef('int getpid(void);')\n"
                "return tonumber(ffi.C.getpid()), ffi.abi('gc64') and 'gc64' "
                "or 'non-gc64', ffi.os .. '/' .. ffi.arch") == 0) {
    long pid = (long)lua_tointeger(L, 1);
    result(pid == (long)getpid(), "require('ffi') works",
           "ffi.C.getpid()=%ld, getpid()=%ld, %s, %s", pid, (long)getpid(),
           lua_tostring(L, 2), lua_tostring(L, 3));
  }
  lua_settop(L, 0);

  /* Asynchronous interrupts of (JIT-compiled) infinite loops. */
  for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
    run_interrupt_case(L, cases[i].code, cases[i].patch);

  /* Interrupted loops go on with their exact state. */
  for (i = 0; i < sizeof(resume_cases) / sizeof(resume_cases[0]); i++)
    run_resume_case(L, resume_cases[i]);

  /* A state whose hooks come from another thread keeps the test in its
   * loops: nothing is patched, the loop is stopped all the same. */
  {
    lua_State *L2 = luaL_newstate();
    luaL_openlibs(L2);
    luaguard_jit_hookreal(L2, 1);
    g_L = L2;
    run_interrupt_case(L2, "local i=0 while true do i=i+1 end", 0);
    g_L = L;
    lua_close(L2);
  }

  /* After all those interrupts the state must still be usable. */
  if (run_plain(L, "state usable after interrupts",
                "local s = 0 for i = 1, 1000 do s = s + i end return s") == 0) {
    lua_Integer s = lua_tointeger(L, 1);
    result(s == 500500, "state usable after interrupts", "sum=%ld", (long)s);
  }
  lua_settop(L, 0);

  lua_close(L);

  if (g_failures) {
    printf("checkhook_test: %d check(s) FAILED\n", g_failures);
    return 1;
  }
  printf("checkhook_test: all checks passed\n");
  return 0;
}
