-- Stopped by lua_budget_memory (4m) with a 503.
local t = {}
for i = 1, 1e6 do t[i] = string.rep("x", 1024 * 1024) .. i end
