"""The directive table an nginx dynamic module registers, read from the .so
itself: the `ngx_modules` array it exports points to each module's
ngx_module_t, whose `commands` field is the ngx_command_t array nginx's
configuration parser consults. Reading it from the file (instead of from
a source file or a hand-kept list) is what makes the documentation test
compare the page with what nginx will actually accept."""

import struct

# nginx's context bits (ngx_http_config.h, ngx_conf_file.h).
HTTP_MAIN = 0x02000000
HTTP_SRV = 0x04000000
HTTP_LOC = 0x08000000
HTTP_UPS = 0x10000000
HTTP_SIF = 0x20000000
HTTP_LIF = 0x40000000
HTTP_LMT = 0x80000000

CONTEXT_NAMES = [(HTTP_MAIN, "http"), (HTTP_SRV, "server"),
                 (HTTP_SIF, "server if"), (HTTP_LOC, "location"),
                 (HTTP_LIF, "location if"), (HTTP_UPS, "upstream"),
                 (HTTP_LMT, "limit_except")]

R_X86_64_64 = 1
R_X86_64_GLOB_DAT = 6
R_X86_64_RELATIVE = 8


class _Elf:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = f.read()
        d = self.data
        if d[:4] != b"\x7fELF" or d[4] != 2 or d[5] != 1:
            raise ValueError(f"{path}: not a little-endian ELF64 file")
        (self.phoff, self.shoff) = struct.unpack_from("<QQ", d, 0x20)
        (self.phentsize, self.phnum, self.shentsize, self.shnum,
         self.shstrndx) = struct.unpack_from("<HHHHH", d, 0x36)
        self.sections = []
        for i in range(self.shnum):
            off = self.shoff + i * self.shentsize
            (name, typ, flags, addr, offset, size, link, info, align,
             entsize) = struct.unpack_from("<IIQQQQIIQQ", d, off)
            self.sections.append(dict(name=name, type=typ, addr=addr,
                                      offset=offset, size=size, link=link,
                                      entsize=entsize))
        self.loads = []
        for i in range(self.phnum):
            off = self.phoff + i * self.phentsize
            (typ, flags, offset, vaddr, paddr, filesz,
             memsz, align) = struct.unpack_from("<IIQQQQQQ", d, off)
            if typ == 1:  # PT_LOAD
                self.loads.append((vaddr, offset, filesz))
        self.symbols = self._symbols()
        self.relocs = self._relocs()

    def _cstr(self, off):
        end = self.data.index(b"\0", off)
        return self.data[off:end].decode("latin-1")

    def _symbols(self):
        syms = {}
        by_index = {}
        for sec in self.sections:
            if sec["type"] not in (2, 11):  # SYMTAB, DYNSYM
                continue
            strtab = self.sections[sec["link"]]["offset"]
            for i in range(sec["size"] // 24):
                off = sec["offset"] + i * 24
                name, info, other, shndx, value, size = struct.unpack_from(
                    "<IBBHQQ", self.data, off)
                n = self._cstr(strtab + name)
                if sec["type"] == 11:
                    by_index[i] = (n, value if shndx else 0)
                if n and shndx:
                    syms[n] = value
        self.dynsym_by_index = by_index
        return syms

    def _relocs(self):
        # vaddr -> the pointer value the dynamic loader stores there, for
        # the relocations that point inside this object.
        out = {}
        for sec in self.sections:
            if sec["type"] != 4:  # RELA
                continue
            for i in range(sec["size"] // 24):
                off = sec["offset"] + i * 24
                where, info, addend = struct.unpack_from("<QQq", self.data,
                                                         off)
                typ, sym = info & 0xffffffff, info >> 32
                if typ == R_X86_64_RELATIVE:
                    out[where] = addend
                elif typ in (R_X86_64_64, R_X86_64_GLOB_DAT):
                    name, value = self.dynsym_by_index.get(sym, ("", 0))
                    if value:
                        out[where] = value + addend
        return out

    def offset(self, vaddr):
        for start, off, size in self.loads:
            if start <= vaddr < start + size:
                return off + vaddr - start
        raise ValueError(f"address {vaddr:#x} is not in the file")

    def word(self, vaddr):
        return struct.unpack_from("<Q", self.data, self.offset(vaddr))[0]

    def pointer(self, vaddr):
        if vaddr in self.relocs:
            return self.relocs[vaddr]
        return self.word(vaddr)

    def string(self, vaddr, length):
        off = self.offset(vaddr)
        return self.data[off:off + length].decode("latin-1")


def module_commands(path):
    """{directive name: type bits} of every module in the .so."""
    elf = _Elf(path)
    modules = elf.symbols["ngx_modules"]
    out = {}
    for i in range(64):
        module = elf.pointer(modules + 8 * i)
        if module == 0:
            break
        cmd = elf.pointer(module + 64)   # ngx_module_t.commands
        while cmd:
            length = elf.word(cmd)
            if length == 0:
                break
            name = elf.string(elf.pointer(cmd + 8), length)
            out[name] = elf.word(cmd + 16) & 0xffffffff
            cmd += 56                    # sizeof(ngx_command_t)
    return out


def contexts(bits):
    """The nginx context names a directive's type bits allow."""
    return [name for bit, name in CONTEXT_NAMES if bits & bit]
