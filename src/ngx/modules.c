/* What nginx's configure would generate for a dynamic module (addon
 * modules.c): the module list and, because we register filters, the order
 * that places our filters where an HTTP_AUX_FILTER module sits in a static
 * build, just before the copy filter. */
#include <ngx_config.h>
#include <ngx_core.h>

extern ngx_module_t ngx_http_luaguard_module;

ngx_module_t *ngx_modules[] = {
    &ngx_http_luaguard_module,
    NULL
};

char *ngx_module_names[] = {
    "ngx_http_luaguard_module",
    NULL
};

char *ngx_module_order[] = {
    "ngx_http_luaguard_module",
    "ngx_http_copy_filter_module",
    NULL
};
