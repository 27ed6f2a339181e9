-- A tenant's bug (or attack): stopped by lua_budget_slice (100ms) with
-- lua_budget_status (503); the worker goes on serving.
while true do end
