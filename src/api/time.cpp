// ngx.now, ngx.time, ngx.today, ngx.localtime, ngx.utctime,
// ngx.update_time, ngx.http_time, ngx.cookie_time, ngx.parse_http_time:
// all read nginx's cached clock, as lua-nginx-module does.

#include "api/api.hpp"
#include "ngx/glue.hpp"

namespace luaguard::api {

namespace {

int now(lua_State *L)
{
    ngx_time_t *tp = ngx_timeofday();
    lua_pushnumber(L, static_cast<lua_Number>(tp->sec)
                          + static_cast<lua_Number>(tp->msec) / 1000.0);
    return 1;
}

int time(lua_State *L)
{
    lua_pushinteger(L, static_cast<lua_Integer>(ngx_time()));
    return 1;
}

int today(lua_State *L)
{
    ngx_tm_t tm;
    ngx_localtime(ngx_time(), &tm);
    u_char buf[sizeof("2010-11-19")];
    u_char *p = ngx_sprintf(buf, "%04d-%02d-%02d", tm.ngx_tm_year,
                            tm.ngx_tm_mon, tm.ngx_tm_mday);
    lua_pushlstring(L, reinterpret_cast<char *>(buf), p - buf);
    return 1;
}

int pushDateTime(lua_State *L, bool local)
{
    ngx_tm_t tm;
    if (local) {
        ngx_localtime(ngx_time(), &tm);
    } else {
        ngx_gmtime(ngx_time(), &tm);
    }
    u_char buf[sizeof("2010-11-19 20:56:31")];
    u_char *p = ngx_sprintf(buf, "%04d-%02d-%02d %02d:%02d:%02d",
                            tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday,
                            tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec);
    lua_pushlstring(L, reinterpret_cast<char *>(buf), p - buf);
    return 1;
}

int localtime(lua_State *L)
{
    return pushDateTime(L, true);
}

int utctime(lua_State *L)
{
    return pushDateTime(L, false);
}

int updateTime(lua_State *)
{
    ngx_time_update();
    return 0;
}

// The seconds argument of http_time / cookie_time. Out-of-range numbers
// would make the conversion to time_t undefined.
time_t checkTime(lua_State *L)
{
    lua_Number n = luaL_checknumber(L, 1);
    luaL_argcheck(L, n > -9007199254740992.0 && n < 9007199254740992.0, 1,
                  "time out of range");
    return static_cast<time_t>(n);
}

// Room for any year ngx_gmtime can produce: years past 9999 (and past
// 2037 in cookie_time's format) are longer than the usual text.
constexpr size_t kTimeBuf = 64;

int httpTime(lua_State *L)
{
    time_t t = checkTime(L);
    u_char buf[kTimeBuf];
    u_char *p = ngx_http_time(buf, t);
    lua_pushlstring(L, reinterpret_cast<char *>(buf), p - buf);
    return 1;
}

int cookieTime(lua_State *L)
{
    time_t t = checkTime(L);
    u_char buf[kTimeBuf];
    u_char *p = ngx_http_cookie_time(buf, t);
    lua_pushlstring(L, reinterpret_cast<char *>(buf), p - buf);
    return 1;
}

int parseHttpTime(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    time_t t = ngx_parse_http_time(
        reinterpret_cast<u_char *>(const_cast<char *>(s)), len);
    if (t == NGX_ERROR) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushinteger(L, static_cast<lua_Integer>(t));
    return 1;
}

int reqStartTime(lua_State *L)
{
    RequestCtx *ctx = glue::requireRequest(L);
    ngx_http_request_t *r = ctx->r;
    lua_pushnumber(L, static_cast<lua_Number>(r->start_sec)
                          + static_cast<lua_Number>(r->start_msec) / 1000.0);
    return 1;
}

}  // namespace

void openTime(lua_State *L)
{
    const luaL_Reg fns[] = {{"now", now},
                            {"time", time},
                            {"today", today},
                            {"localtime", localtime},
                            {"utctime", utctime},
                            {"update_time", updateTime},
                            {"http_time", httpTime},
                            {"cookie_time", cookieTime},
                            {"parse_http_time", parseHttpTime},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
    subTable(L, "req");
    lua_pushcfunction(L, reqStartTime);
    lua_setfield(L, -2, "start_time");
    lua_pop(L, 1);
}

}  // namespace luaguard::api
