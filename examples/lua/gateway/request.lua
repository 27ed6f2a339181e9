local _M = {}


-- nginx makes a new $request_id each time the variable is read unless the
-- configuration indexes it (log_format, add_header): read it once and keep
-- it for the request's later phases.
function _M.id()
    local ctx = ngx.ctx
    local id = ctx.request_id
    if not id then
        id = ngx.var.request_id
        ctx.request_id = id
    end
    return id
end


return _M
