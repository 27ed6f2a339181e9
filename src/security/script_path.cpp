#include "security/script_path.hpp"

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

namespace luaguard::script {

namespace {

class Fd {
 public:
    explicit Fd(int fd = -1) : fd_(fd) {}
    ~Fd()
    {
        if (fd_ >= 0) {
            ::close(fd_);
        }
    }
    Fd(const Fd &) = delete;
    Fd &operator=(const Fd &) = delete;
    int get() const { return fd_; }

 private:
    int fd_;
};

Verdict fromErrno(int err, std::string *why)
{
    *why = std::strerror(err);
    switch (err) {
    case ENOENT:
    case ENOTDIR:
        return Verdict::NotFound;
    case EACCES:
    case EPERM:
        return Verdict::Forbidden;
    case EXDEV:
    case ELOOP:
        *why = "the path leaves the Lua file root (through a symlink)";
        return Verdict::Refused;
    default:
        return Verdict::Forbidden;
    }
}

// Writable by someone other than the owner, as the policy counts it.
const char *writableBy(const struct stat &st, Writable w)
{
    if (w == Writable::Off) {
        return nullptr;
    }
    if (st.st_mode & S_IWOTH) {
        return "world-writable";
    }
    if (w == Writable::Group && (st.st_mode & S_IWGRP)) {
        return "group-writable";
    }
    return nullptr;
}

Verdict checkFile(int fd, const Policy &policy, std::string *why)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        return fromErrno(errno, why);
    }
    if (!S_ISREG(st.st_mode)) {
        *why = "not a regular file";
        return Verdict::Refused;
    }
    if (const char *w = writableBy(st, policy.writable)) {
        *why = std::string("the file is ") + w;
        return Verdict::Unsafe;
    }
    if (!policy.owners.empty()
        && std::find(policy.owners.begin(), policy.owners.end(), st.st_uid)
               == policy.owners.end())
    {
        *why = "the file's owner (uid " + std::to_string(st.st_uid)
               + ") is not in lua_file_owners";
        return Verdict::Unsafe;
    }
    return Verdict::Ok;
}

// Every directory from `dir` (absolute) up to "/", as sshd checks the
// directories above authorized_keys: one that someone other than its
// owner may write without the sticky bit lets that someone rename the
// directory below it and serve their own script; with lua_file_owners
// set, a directory must also belong to root or to a listed owner, who
// could otherwise do the same.
Verdict checkAncestors(const std::string &dir, const Policy &policy,
                       std::string *why)
{
    if (policy.writable == Writable::Off && policy.owners.empty()) {
        return Verdict::Ok;
    }
    std::string d = dir;
    while (d.size() > 1 && d.back() == '/') {
        d.pop_back();
    }
    for (;;) {
        struct stat st;
        if (stat(d.c_str(), &st) != 0) {
            return fromErrno(errno, why);
        }
        const char *w = (st.st_mode & S_ISVTX) ? nullptr
                                               : writableBy(st, policy.writable);
        if (w) {
            *why = "directory \"" + d + "\" is " + w;
            return Verdict::Unsafe;
        }
        if (!policy.owners.empty() && st.st_uid != 0
            && std::find(policy.owners.begin(), policy.owners.end(),
                         st.st_uid) == policy.owners.end())
        {
            *why = "directory \"" + d + "\" belongs to uid "
                   + std::to_string(st.st_uid)
                   + ", neither root nor in lua_file_owners";
            return Verdict::Unsafe;
        }
        size_t slash = d.rfind('/');
        if (slash == std::string::npos || d == "/") {
            return Verdict::Ok;
        }
        d = slash == 0 ? "/" : d.substr(0, slash);
    }
}

std::string parentOf(const std::string &path)
{
    size_t slash = path.rfind('/');
    if (slash == std::string::npos) {
        return ".";
    }
    return slash == 0 ? "/" : path.substr(0, slash);
}

// The directories above the file the kernel opened, symlinks resolved
// (the path of `fd` in /proc), then those above the path as written, so
// a symlink and its target are both covered.
Verdict checkOpenedFile(int fd, const std::string &written,
                        const Policy &policy, std::string *why)
{
    char link[PATH_MAX];
    std::string proc = "/proc/self/fd/" + std::to_string(fd);
    ssize_t n = readlink(proc.c_str(), link, sizeof(link) - 1);
    if (n <= 0 || link[0] != '/') {
        *why = "cannot tell where the script lives (" + proc + ")";
        return Verdict::Unsafe;
    }
    Verdict v = checkAncestors(parentOf(std::string(link, n)), policy, why);
    if (v == Verdict::Ok) {
        v = checkAncestors(parentOf(written), policy, why);
    }
    return v;
}

Verdict readAll(int fd, std::string *code, std::string *why)
{
    char buf[16384];
    for (;;) {
        ssize_t n = ::read(fd, buf, sizeof(buf));
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return fromErrno(errno, why);
        }
        if (n == 0) {
            return Verdict::Ok;
        }
        code->append(buf, static_cast<size_t>(n));
    }
}

int openBeneath(int rootfd, const std::string &relative)
{
    struct open_how how {};
    how.flags = O_RDONLY | O_CLOEXEC | O_NOCTTY;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    long fd = syscall(SYS_openat2, rootfd, relative.c_str(), &how,
                      sizeof(how));
    return static_cast<int>(fd);
}

}  // namespace

Verdict confine(std::string_view full, const Policy &policy,
                std::string *relative, std::string *why)
{
    if (full.find('\0') != std::string_view::npos) {
        *why = "NUL byte in the path";
        return Verdict::Refused;
    }
    const std::string &root = policy.root;
    if (full.size() <= root.size() + 1 || full.compare(0, root.size(), root) != 0
        || full[root.size()] != '/')
    {
        *why = "the path is outside the Lua file root \"" + root + "\"";
        return Verdict::Refused;
    }
    std::string_view rel = full.substr(root.size() + 1);
    size_t start = 0;
    while (start <= rel.size()) {
        size_t end = rel.find('/', start);
        if (end == std::string_view::npos) {
            end = rel.size();
        }
        if (rel.substr(start, end - start) == "..") {
            *why = "\"..\" segment in the path";
            return Verdict::Refused;
        }
        start = end + 1;
    }
    relative->assign(rel.data(), rel.size());
    return Verdict::Ok;
}

Verdict load(const std::string &full, const std::string &relative,
             bool confined, const Policy &policy, std::string *code,
             std::string *why)
{
    if (!confined) {
        Fd fd(::open(full.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
        if (fd.get() < 0) {
            return fromErrno(errno, why);
        }
        Verdict v = checkFile(fd.get(), policy, why);
        if (v == Verdict::Ok) {
            v = checkOpenedFile(fd.get(), full, policy, why);
        }
        if (v != Verdict::Ok) {
            return v;
        }
        return readAll(fd.get(), code, why);
    }

    Fd rootfd(::open(policy.root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (rootfd.get() < 0) {
        return fromErrno(errno, why);
    }
    Fd fd(openBeneath(rootfd.get(), relative));
    if (fd.get() < 0) {
        return fromErrno(errno, why);
    }
    Verdict v = checkFile(fd.get(), policy, why);
    if (v == Verdict::Ok) {
        v = checkOpenedFile(fd.get(), policy.root + "/" + relative, policy,
                            why);
    }
    if (v != Verdict::Ok) {
        return v;
    }
    return readAll(fd.get(), code, why);
}

}  // namespace luaguard::script
