// require "ngx.ocsp": OCSP stapling driven from ssl_certificate_by_lua.
// The chain arguments are DER certificates back to back (what
// ngx.ssl.cert_pem_to_der gives): the leaf, then its issuer. Results and
// error strings are lua-nginx-module's (tests/e2e/test_ocsp.py compares
// them), except that a response must be signed by the issuer or a
// responder the issuer delegated to (the reference checks the signature
// against whatever certificate the response carries). ngx/tls.cpp has the
// hook that sends the stapled response.

#include <openssl/err.h>
#include <openssl/ocsp.h>
#include <openssl/x509.h>

#include <algorithm>
#include <memory>
#include <string>

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "ngx/tls.hpp"

namespace luaguard::api {

namespace {

// lua-resty-core's default buffer size, the default of every max_len.
constexpr lua_Integer kDefaultMax = 4096;

template <typename T, void (*F)(T *)>
struct Free {
    void operator()(T *p) const { F(p); }
};
using X509Ptr = std::unique_ptr<X509, Free<X509, X509_free>>;
using CertIdPtr = std::unique_ptr<OCSP_CERTID, Free<OCSP_CERTID,
                                                    OCSP_CERTID_free>>;
using RespPtr = std::unique_ptr<OCSP_RESPONSE, Free<OCSP_RESPONSE,
                                                    OCSP_RESPONSE_free>>;
using BasicPtr = std::unique_ptr<OCSP_BASICRESP, Free<OCSP_BASICRESP,
                                                      OCSP_BASICRESP_free>>;
using ReqPtr = std::unique_ptr<OCSP_REQUEST, Free<OCSP_REQUEST,
                                                  OCSP_REQUEST_free>>;
using StorePtr = std::unique_ptr<X509_STORE, Free<X509_STORE,
                                                  X509_STORE_free>>;

// The string at `idx`; anything else raises (the reference fails on the
// length of a non-string, the number too).
const char *stringArg(lua_State *L, int idx, size_t *len)
{
    if (lua_type(L, idx) != LUA_TSTRING) {
        luaL_typerror(L, idx, "string");
    }
    return lua_tolstring(L, idx, len);
}

lua_Integer maxArg(lua_State *L, int idx)
{
    return lua_isnoneornil(L, idx) ? kDefaultMax : luaL_checkinteger(L, idx);
}

// The DER chain read a certificate at a time; trailing bytes after the
// certificates asked for are ignored, as the reference does.
class Chain {
public:
    Chain(const char *der, size_t len)
        : bio_(BIO_new_mem_buf(der, static_cast<int>(len)))
    {
    }
    ~Chain() { BIO_free(bio_); }
    Chain(const Chain &) = delete;
    Chain &operator=(const Chain &) = delete;

    X509Ptr next()
    {
        X509Ptr x(bio_ ? d2i_X509_bio(bio_, nullptr) : nullptr);
        ERR_clear_error();
        return x;
    }

    bool atEnd() const { return bio_ == nullptr || BIO_pending(bio_) == 0; }

private:
    BIO *bio_;
};

constexpr char kBadCert[] = "d2i_X509_bio() failed";
constexpr char kNoIssuer[] = "no issuer certificate in chain";

// The issuer after the leaf: its absence and a broken one are two errors.
const char *readIssuer(Chain *chain, X509Ptr *issuer)
{
    if (chain->atEnd()) {
        return kNoIssuer;
    }
    *issuer = chain->next();
    return *issuer ? nullptr : kBadCert;
}

// nil and the error; OpenSSL's queue is emptied (its entries may quote
// the input).
int fail(lua_State *L, const char *err)
{
    ERR_clear_error();
    return pushNilErr(L, err);
}

int getResponder(lua_State *L)
{
    size_t len;
    const char *der = stringArg(L, 1, &len);
    lua_Integer max = maxArg(L, 2);
    Chain chain(der, len);
    X509Ptr leaf = chain.next();
    if (!leaf) {
        return fail(L, kBadCert);
    }
    STACK_OF(OPENSSL_STRING) *urls = X509_get1_ocsp(leaf.get());
    if (urls == nullptr || sk_OPENSSL_STRING_num(urls) == 0) {
        X509_email_free(urls);
        // No responder is no error: nil alone, as the reference answers.
        lua_pushnil(L);
        return 1;
    }
    std::string url = sk_OPENSSL_STRING_value(urls, 0);
    X509_email_free(urls);
    X509Ptr issuer;
    if (const char *err = readIssuer(&chain, &issuer)) {
        return fail(L, err);
    }
    if (max < 0 || url.size() > static_cast<size_t>(max)) {
        lua_pushlstring(L, url.data(),
                        max < 0 ? 0 : static_cast<size_t>(max));
        lua_pushliteral(L, "truncated");
        return 2;
    }
    lua_pushlstring(L, url.data(), url.size());
    return 1;
}

int createRequest(lua_State *L)
{
    size_t len;
    const char *der = stringArg(L, 1, &len);
    lua_Integer max = maxArg(L, 2);
    Chain chain(der, len);
    X509Ptr leaf = chain.next();
    if (!leaf) {
        return fail(L, kBadCert);
    }
    X509Ptr issuer;
    if (const char *err = readIssuer(&chain, &issuer)) {
        return fail(L, err);
    }
    ReqPtr req(OCSP_REQUEST_new());
    if (!req) {
        return fail(L, "OCSP_REQUEST_new() failed");
    }
    OCSP_CERTID *id = OCSP_cert_to_id(nullptr, leaf.get(), issuer.get());
    if (id == nullptr) {
        return fail(L, "OCSP_cert_to_id() failed");
    }
    if (OCSP_request_add0_id(req.get(), id) == nullptr) {
        OCSP_CERTID_free(id);
        return fail(L, "OCSP_request_add0_id() failed");
    }
    int n = i2d_OCSP_REQUEST(req.get(), nullptr);
    if (n <= 0) {
        return fail(L, "i2d_OCSP_REQUEST() failed");
    }
    if (n > max) {
        lua_pushnil(L);
        lua_pushfstring(L, "output buffer too small: %d > %d", n,
                        static_cast<int>(max));
        return 2;
    }
    unsigned char *out = nullptr;
    n = i2d_OCSP_REQUEST(req.get(), &out);
    if (n <= 0) {
        return fail(L, "i2d_OCSP_REQUEST() failed");
    }
    lua_pushlstring(L, reinterpret_cast<char *>(out), static_cast<size_t>(n));
    OPENSSL_free(out);
    return 1;
}

// Whether `basic` is signed by `issuer` or by a responder `issuer`
// certified for OCSP signing (RFC 6960 4.2.2.2). The issuer is the trust
// anchor: the server's own chain names it, whatever is above it.
bool signedForIssuer(OCSP_BASICRESP *basic, X509 *issuer)
{
    StorePtr store(X509_STORE_new());
    STACK_OF(X509) *untrusted = sk_X509_new_null();
    bool ok = store && untrusted
              && X509_STORE_add_cert(store.get(), issuer) == 1
              && X509_STORE_set_flags(store.get(),
                                      X509_V_FLAG_PARTIAL_CHAIN) == 1
              && sk_X509_push(untrusted, issuer) > 0
              && OCSP_basic_verify(basic, untrusted, store.get(), 0) == 1;
    sk_X509_free(untrusted);
    return ok;
}

// The reason `resp` does not vouch for the chain's leaf, or empty.
std::string checkResponse(const char *resp, size_t resp_len,
                          const char *der, size_t der_len)
{
    auto *p = reinterpret_cast<const unsigned char *>(resp);
    RespPtr ocsp(d2i_OCSP_RESPONSE(nullptr, &p, static_cast<long>(resp_len)));
    if (!ocsp) {
        return "d2i_OCSP_RESPONSE() failed";
    }
    int status = OCSP_response_status(ocsp.get());
    if (status != OCSP_RESPONSE_STATUS_SUCCESSFUL) {
        return "OCSP response not successful (" + std::to_string(status)
               + ": " + OCSP_response_status_str(status) + ")";
    }
    BasicPtr basic(OCSP_response_get1_basic(ocsp.get()));
    if (!basic) {
        return "OCSP_response_get1_basic() failed";
    }
    Chain chain(der, der_len);
    X509Ptr leaf = chain.next();
    if (!leaf) {
        return kBadCert;
    }
    X509Ptr issuer;
    if (const char *err = readIssuer(&chain, &issuer)) {
        return err;
    }
    CertIdPtr id(OCSP_cert_to_id(nullptr, leaf.get(), issuer.get()));
    if (!id) {
        return "OCSP_cert_to_id() failed";
    }
    int cert_status, reason;
    ASN1_GENERALIZEDTIME *revoked, *this_upd, *next_upd;
    if (OCSP_resp_find_status(basic.get(), id.get(), &cert_status, &reason,
                              &revoked, &this_upd, &next_upd) != 1) {
        return "certificate status not found in the OCSP response";
    }
    // Before the status is believed: a forged "revoked" is no verdict.
    if (!signedForIssuer(basic.get(), issuer.get())) {
        return "OCSP_basic_verify() failed";
    }
    if (cert_status != V_OCSP_CERTSTATUS_GOOD) {
        return std::string("certificate status \"")
               + OCSP_cert_status_str(cert_status) + "\" in the OCSP response";
    }
    // Five minutes of clock skew, as OpenSSL's tools allow.
    if (OCSP_check_validity(this_upd, next_upd, 300, -1) != 1) {
        return "OCSP_check_validity() failed";
    }
    return {};
}

int validateResponse(lua_State *L)
{
    size_t resp_len, der_len;
    const char *resp = stringArg(L, 1, &resp_len);
    const char *der = stringArg(L, 2, &der_len);
    lua_Integer max = maxArg(L, 3);
    std::string err = checkResponse(resp, resp_len, der, der_len);
    ERR_clear_error();
    if (err.empty()) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushnil(L);
    lua_pushlstring(L, err.data(),
                    std::min(err.size(), static_cast<size_t>(
                        max < 0 ? 0 : max)));
    return 2;
}

int setStatusResp(lua_State *L)
{
    size_t len;
    const char *resp = stringArg(L, 1, &len);
    if (g_run == nullptr || g_run->ctx == nullptr) {
        return luaL_error(L, "no request found");
    }
    ngx_connection_t *c = nullptr;
    SSL *ssl = tls::currentSsl(&c);
    if (ssl == nullptr) {
        return pushNilErr(L, "bad request");
    }
    if (SSL_get_tlsext_status_type(ssl) != TLSEXT_STATUSTYPE_ocsp) {
        lua_pushboolean(L, 1);
        lua_pushliteral(L, "no status req");
        return 2;
    }
    // The reference copies with OPENSSL_malloc, which gives nothing for
    // an empty response: its error, for the same input.
    auto *copy = len ? static_cast<unsigned char *>(OPENSSL_memdup(resp, len))
                     : nullptr;
    if (copy == nullptr) {
        return fail(L, "OPENSSL_malloc() failed");
    }
    if (SSL_set_tlsext_status_ocsp_resp(ssl, copy, static_cast<long>(len))
        != 1) {
        OPENSSL_free(copy);
        return fail(L, "SSL_set_tlsext_status_ocsp_resp() failed");
    }
    lua_pushboolean(L, 1);
    return 1;
}

int openModule(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"get_ocsp_responder_from_der_chain", getResponder},
        {"create_ocsp_request", createRequest},
        {"validate_ocsp_response", validateResponse},
        {"set_ocsp_status_resp", setStatusResp},
        {nullptr, nullptr}};
    pushRestyModule(L, fns);
    return 1;
}

}  // namespace

void openOcsp(lua_State *L)
{
    preload(L, "ngx.ocsp", openModule);
}

}  // namespace luaguard::api
