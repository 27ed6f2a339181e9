-- Table lookups that miss and follow __index tables: the interpreter
-- follows up to LJ_IDXCHAIN_FAST of them itself
-- (scripts/luajit-patches/index-chain.patch). Every result and error here
-- is Lua 5.1's; each case runs interpreted and then compiled.
-- Run by tests/luajit/run_lua.c (CTest luajit.index_chain).

local function chain(n, last)
    local t = last
    for _ = 1, n do
        t = setmetatable({}, { __index = t })
    end
    return t
end

local function cases()
    -- One table followed: found, false, absent.
    local base = { a = 1, b = false }
    local t = setmetatable({}, { __index = base })
    assert(t.a == 1 and t.b == false and t.c == nil)

    -- A key present with a nil value (deleted) goes on to the next table.
    local mid = { x = 1 }
    mid.x = nil
    setmetatable(mid, { __index = { x = "deep" } })
    assert(setmetatable({}, { __index = mid }).x == "deep")

    -- A function at the end of a table chain is called with that table.
    local fn_end = setmetatable({}, { __index = function(self, k)
        return self, "fn:" .. k
    end })
    local via = setmetatable({}, { __index = fn_end })
    local got = via.zzz
    assert(got == fn_end, "the function gets the table whose __index it is")

    -- Chains shorter than, as long as and longer than the inline limit.
    for n = 1, 20 do
        local c = chain(n, { v = n })
        assert(c.v == n and c.nope == nil, n)
    end

    -- Loops end in Lua's error, never in a hang.
    local A, B = {}, {}
    setmetatable(A, { __index = B })
    setmetatable(B, { __index = A })
    local ok, err = pcall(function() return A.q end)
    assert(not ok and err:find("loop in gettable", 1, true), err)
    local S = {}
    S.__index = S
    setmetatable(S, S)
    ok, err = pcall(function() return S.q end)
    assert(not ok and err:find("loop in gettable", 1, true), err)
    S.q = 5
    assert(S.q == 5)

    -- A metatable without __index (its absence not cached yet), and a
    -- table of the chain whose metatable has none.
    local m = setmetatable({}, { __newindex = function() end })
    assert(m.k == nil and m.k == nil)
    local h = setmetatable({}, { __index = setmetatable({}, {
        __call = function() end }) })
    assert(h.k == nil)

    -- An __index table with an __index of its own that appears later.
    local late = {}
    local lt = setmetatable({}, { __index = late })
    assert(lt.z == nil)
    setmetatable(late, { __index = { z = "late" } })
    assert(lt.z == "late")

    -- Globals (GGET) through an environment chain; global misses.
    local env = chain(2, _G)
    local g = setfenv(function()
        return type(print), undefined_global_here, string.format("%d", 3)
    end, env)
    local a1, a2, a3 = g()
    assert(a1 == "function" and a2 == nil and a3 == "3")

    -- A string key in a variable (TGETV) and numbers (not followed inline).
    local key = "a"
    assert(t[key] == 1 and t[key .. "x"] == nil)
    local arr = setmetatable({}, { __index = { 10, 20 } })
    assert(arr[1] == 10 and arr[2] == 20 and arr[3] == nil)

    -- Nothing cached: changes to the tables and to __index are seen.
    base.a = 2
    assert(t.a == 2)
    getmetatable(t).__index = function() return "now fn" end
    assert(t.a == "now fn")
    getmetatable(t).__index = nil
    assert(t.a == nil)
    base.a = 1

    -- Values of every type come back whole.
    local co = coroutine.create(function() end)
    local ud = newproxy(false)
    local vals = { n = 1.5, i = -7, s = "s", f = print, t = base, c = co,
                   u = ud, yes = true }
    local v = chain(3, vals)
    for k, want in pairs(vals) do
        assert(v[k] == want, k)
    end

    -- Strings' own metatable (__index = string) is unaffected.
    assert(("x"):rep(3) == "xxx")
end

-- A count hook still fires in a loop of chained lookups.
local function hooked()
    local c = chain(5, { v = 1 })
    local n = 0
    debug.sethook(function() n = n + 1 end, "", 1000)
    local s = 0
    for _ = 1, 100000 do
        s = s + c.v
    end
    debug.sethook()
    assert(s == 100000 and n > 50, n)
end

-- The GC runs while chains are followed.
local function collected()
    for i = 1, 3000 do
        local x = setmetatable({}, {
            __index = setmetatable({ i = i }, { __index = { j = i } }) })
        assert(x.i == i and x.j == i and x.k == nil)
        if i % 300 == 0 then
            collectgarbage()
        end
    end
end

jit.off()
cases()
hooked()
collected()
jit.on()
for _ = 1, 200 do   -- hot enough to compile
    cases()
end
hooked()
collected()
print("index_chain: all cases passed")
