/*
 * vmdkfuzz.c -- checks vmdk.c on its own, built with AddressSanitizer and UBSan by `make check`.
 *
 * First a known chain (a hosted sparse base, a flat base behind a text descriptor, a sparse
 * child over each) is read back byte for byte. Then a fixed-seed fuzz loop mutates those files
 * (header fields, grain directory and tables, descriptor text, truncation) and opens, reads and
 * queries each mutant: any result is fine except a crash, a sanitizer report, a hang, or an
 * open that fails with VIX_OK's absence of a reason. The VMDK files here are written by this
 * program from the specification; the Python builder (tests/testbed/vmdk.py) and the
 * differential tests against real VDDK cover the real-world layouts.
 *
 * Usage: vmdkfuzz [iterations] (default 2000; about a second).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vmdk.h"

#define SECTOR 512
#define GRAIN 8        /* sectors: small grains, so two grain tables cover the disk */
#define CAPACITY 8192  /* sectors (4 MiB): 1024 grains */
#define NGRAINS (CAPACITY / GRAIN)
#define NGTS (NGRAINS / 512)

static int failures;
static char dir[256];

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "vmdkfuzz: FAIL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    failures++;
}

/* Deterministic contents: byte i of grain g in link k. */
static uint8_t pattern(int k, uint64_t g, uint64_t i) { return (uint8_t)(k * 131 + g * 7 + i * 13 + 1); }

static int base_has(uint64_t g) { return g % 41 == 0 || g == NGRAINS - 1; }
static int child_has(uint64_t g) { return g % 53 == 3 || g == 600 || g == 601; }

typedef struct {
    uint8_t *b;
    size_t n;
} buf_t;

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

/* A hosted monolithicSparse file holding link `k`'s grains (`has` says which). */
static buf_t sparse_file(int k, int (*has)(uint64_t), const char *name, uint32_t cid,
                         uint32_t parent_cid, const char *hint) {
    uint64_t gd = 21, gts = gd + 1, overhead = (gts + NGTS * 4 + GRAIN - 1) / GRAIN * GRAIN;
    uint64_t ngr = 0;
    for (uint64_t g = 0; g < NGRAINS; g++) ngr += has(g);
    buf_t f = {.n = (overhead + ngr * GRAIN) * SECTOR};
    f.b = calloc(1, f.n);
    uint8_t *h = f.b;
    put32(h, 0x564d444b);
    put32(h + 4, 1);
    put32(h + 8, 1);
    put64(h + 12, CAPACITY);
    put64(h + 20, GRAIN);
    put64(h + 28, 1);
    put64(h + 36, 20);
    put32(h + 44, 512);
    put64(h + 48, 0);
    put64(h + 56, gd);
    put64(h + 64, overhead);
    h[73] = '\n', h[74] = ' ', h[75] = '\r', h[76] = '\n';
    char text[2048];
    int len = snprintf(text, sizeof(text),
                       "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=%08x\n"
                       "parentCID=%08x\ncreateType=\"monolithicSparse\"\n%s%s%s"
                       "\n# Extent description\nRW %d SPARSE \"%s\"\n\n#DDB\n"
                       "ddb.adapterType = \"lsilogic\"\n",
                       cid, parent_cid, hint ? "parentFileNameHint=\"" : "", hint ? hint : "",
                       hint ? "\"\n" : "", CAPACITY, name);
    memcpy(f.b + SECTOR, text, (size_t)len);
    for (uint64_t t = 0; t < NGTS; t++) put32(f.b + gd * SECTOR + 4 * t, (uint32_t)(gts + t * 4));
    uint64_t at = overhead;
    for (uint64_t g = 0; g < NGRAINS; g++) {
        if (!has(g)) continue;
        put32(f.b + gts * SECTOR + 4 * g, (uint32_t)at);
        for (uint64_t i = 0; i < GRAIN * SECTOR; i++) f.b[at * SECTOR + i] = pattern(k, g, i);
        at += GRAIN;
    }
    return f;
}

static buf_t text_file(const char *fmt, ...) {
    buf_t f = {.b = malloc(4096)};
    va_list ap;
    va_start(ap, fmt);
    f.n = (size_t)vsnprintf((char *)f.b, 4096, fmt, ap);
    va_end(ap);
    return f;
}

static void save(const char *name, const buf_t *f) {
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, f->b, f->n) != (ssize_t)f->n) fail("cannot write %s", path);
    if (fd >= 0) close(fd);
}

/* The flat base: pattern(0, g, i) where base_has(g), zeros elsewhere. */
static buf_t flat_file(void) {
    buf_t f = {.n = (size_t)CAPACITY * SECTOR};
    f.b = calloc(1, f.n);
    for (uint64_t g = 0; g < NGRAINS; g++)
        if (base_has(g))
            for (uint64_t i = 0; i < GRAIN * SECTOR; i++) f.b[g * GRAIN * SECTOR + i] = pattern(0, g, i);
    return f;
}

static VixError open_at(const char *name, int single, vmdk_disk_t **d) {
    char path[512], why[512] = "";
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    VixError e = vmdk_open(path, single, d, why, sizeof(why));
    if (e && !*why) fail("%s: error %llu without a reason", name, (unsigned long long)e);
    return e;
}

/* Reads the whole disk and checks it against the patterns. */
static void check_chain(const char *top, int single, int links) {
    vmdk_disk_t *d;
    VixError e = open_at(top, single, &d);
    if (e) {
        fail("%s: open error %llu", top, (unsigned long long)e);
        return;
    }
    if (vmdk_capacity(d) != CAPACITY || vmdk_num_links(d) != links)
        fail("%s: capacity %llu links %d", top, (unsigned long long)vmdk_capacity(d),
             vmdk_num_links(d));
    uint8_t *buf = malloc((size_t)CAPACITY * SECTOR);
    e = vmdk_read(d, 0, CAPACITY, buf);
    if (e) fail("%s: read error %llu", top, (unsigned long long)e);
    int is_child = links == 2 || (single && strstr(top, "-000001"));
    for (uint64_t g = 0; g < NGRAINS && !e; g++) {
        int k = is_child && child_has(g) ? 1 : (!single || !is_child) && base_has(g) ? 0 : -1;
        for (uint64_t i = 0; i < GRAIN * SECTOR; i++) {
            uint8_t want = k < 0 ? 0 : pattern(k, g, i);
            if (buf[g * GRAIN * SECTOR + i] != want) {
                fail("%s single=%d: grain %llu byte %llu is %u, not %u", top, single,
                     (unsigned long long)g, (unsigned long long)i, buf[g * GRAIN * SECTOR + i], want);
                g = NGRAINS;
                break;
            }
        }
    }
    /* Allocation at chunk 128 (16 grains): a chunk is listed iff one of its grains is held. */
    VixDiskLibBlock *runs;
    size_t n;
    e = vmdk_query_allocated(d, 0, CAPACITY, 128, &runs, &n);
    if (e) fail("%s: query error %llu", top, (unsigned long long)e);
    uint8_t listed[CAPACITY / 128] = {0};
    for (size_t r = 0; r < n; r++)
        for (uint64_t s = runs[r].offset; s < runs[r].offset + runs[r].length; s += 128) listed[s / 128] = 1;
    for (size_t r = 1; r < n; r++)
        if (runs[r - 1].offset + runs[r - 1].length >= runs[r].offset) fail("%s: runs not joined", top);
    for (uint64_t c = 0; c < CAPACITY / 128; c++) {
        int want = 0;
        for (uint64_t g = c * 16; g < (c + 1) * 16; g++)
            want |= (is_child && child_has(g)) || ((!single || !is_child) && base_has(g)) ||
                    (strstr(top, "flat") && (!single || !is_child));
        if (listed[c] != want) fail("%s single=%d: chunk %llu listed=%d", top, single, (unsigned long long)c, listed[c]);
    }
    free(runs);
    free(buf);
    vmdk_close(d);
}

/* ---- fuzzing --------------------------------------------------------------------------- */
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static const char *const snippets[] = {
    "RW 0 SPARSE \"x\"", "RW 99999999999999999999 FLAT \"flat.bin\"", "NOACCESS 8192 ZERO",
    "CID=", "CID=zz", "parentCID=ffffffff", "parentFileNameHint=\"", "parentFileNameHint=\"fz.vmdk\"",
    "createType=\"vmfs\"", "createType=\"streamOptimized\"", "RW 8192 VMFSRDM \"x\"",
    "RW 4096 FLAT \"flat.bin\" 4096", "RW 8192 SPARSE \"/\"", "\"", "=", "\n", "\r\n", "#",
    "RW 8192 FLAT \"..\"", "RW 18446744073709551615 ZERO", "RW 8192 SPARSE \"fz.vmdk\"",
};

static void mutate(buf_t *f, int text) {
    int k = 1 + (int)(rnd() % 4);
    for (int m = 0; m < k; m++) {
        uint64_t r = rnd();
        switch (r % 6) {
        case 0: /* a header or descriptor byte */
            if (f->n) f->b[rnd() % (f->n < 12288 ? f->n : 12288)] = (uint8_t)rnd();
            break;
        case 1: /* a header field set to an edge value */
            if (!text && f->n >= 80) {
                static const int offs[] = {4, 8, 12, 20, 28, 36, 44, 48, 56, 64, 72, 77};
                static const uint64_t vals[] = {0, 1, 2, 3, 4, 7, 8, 96, 511, 512, 0xffffffff,
                                                0xffffffffffffffffULL, 1ULL << 40, 21, 22};
                int o = offs[rnd() % 12];
                uint64_t v = vals[rnd() % 15];
                if (o == 72) f->b[o] = (uint8_t)v;
                else if (o == 4 || o == 8 || o == 44) put32(f->b + o, (uint32_t)v);
                else put64(f->b + o, v);
            }
            break;
        case 2: /* a grain directory or table entry */
            if (!text && f->n > 22 * SECTOR + 4 * 1024)
                put32(f->b + 21 * SECTOR + 4 * (rnd() % (SECTOR / 4 + 1024)), (uint32_t)(rnd() % 200000));
            break;
        case 3: /* truncate */
            f->n = (size_t)(rnd() % (f->n + 1));
            break;
        case 4: /* splice a snippet into the descriptor text */
        {
            const char *s = snippets[rnd() % (sizeof(snippets) / sizeof(snippets[0]))];
            size_t base = text ? 0 : SECTOR, lim = text ? f->n : SECTOR * 21;
            if (lim > f->n || lim <= base) break;
            size_t at = base + rnd() % (lim - base), sl = strlen(s);
            if (at + sl <= f->n) memcpy(f->b + at, s, sl);
            break;
        }
        default: /* flip a bit anywhere */
            if (f->n) f->b[rnd() % f->n] ^= (uint8_t)(1u << (rnd() % 8));
        }
    }
}

static void exercise(const char *name) {
    for (int single = 0; single < 2; single++) {
        vmdk_disk_t *d;
        if (open_at(name, single, &d)) continue;
        uint64_t cap = vmdk_capacity(d);
        uint8_t buf[64 * SECTOR];
        for (int i = 0; i < 8 && cap; i++) {
            uint64_t n = 1 + rnd() % 64;
            if (n > cap) n = cap;
            uint64_t s = i == 0 ? 0 : i == 1 ? cap - n : rnd() % (cap - n + 1);
            (void)vmdk_read(d, s, n, buf);
        }
        if (cap >= 128) {
            uint64_t n = cap / 128 * 128;
            if (n > 128ULL * 128) n = 128ULL * 128;
            VixDiskLibBlock *runs;
            size_t nr;
            if (vmdk_query_allocated(d, 0, n, 128, &runs, &nr) == VIX_OK) free(runs);
        }
        (void)vmdk_parent_hint(d);
        vmdk_close(d);
    }
}

int main(int argc, char **argv) {
    int iterations = argc > 1 ? atoi(argv[1]) : 2000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* In memory where there is a tmpfs: the loop rewrites files thousands of times. */
    snprintf(dir, sizeof(dir), "%s/vmdkfuzz-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    buf_t base = sparse_file(0, base_has, "base.vmdk", 0x11111111, 0xffffffff, NULL);
    buf_t child = sparse_file(1, child_has, "base-000001.vmdk", 0x22222222, 0x11111111, "base.vmdk");
    buf_t flat = flat_file();
    buf_t flatdesc = text_file("# Disk DescriptorFile\nversion=1\nCID=33333333\nparentCID=ffffffff\n"
                               "createType=\"vmfs\"\n\nRW %d VMFS \"flat-flat.vmdk\" 0\n", CAPACITY);
    buf_t fchild = sparse_file(1, child_has, "flat-000001.vmdk", 0x44444444, 0x33333333, "flat.vmdk");
    save("base.vmdk", &base);
    save("base-000001.vmdk", &child);
    save("flat-flat.vmdk", &flat);
    save("flat.vmdk", &flatdesc);
    save("flat-000001.vmdk", &fchild);
    check_chain("base.vmdk", 0, 1);
    check_chain("base-000001.vmdk", 0, 2);
    check_chain("base-000001.vmdk", 1, 1);
    check_chain("flat.vmdk", 0, 1);
    check_chain("flat-000001.vmdk", 0, 2);
    check_chain("flat-000001.vmdk", 1, 1);

    const struct {
        const char *name;
        buf_t *seed;
        int text;
    } targets[] = {{"base-000001.vmdk", &child, 0}, {"base.vmdk", &base, 0},
                   {"flat.vmdk", &flatdesc, 1}, {"flat-000001.vmdk", &fchild, 0}};
    for (int it = 0; it < iterations; it++) {
        int t = (int)(rnd() % 4);
        buf_t m = {.n = targets[t].seed->n, .b = malloc(targets[t].seed->n + 1)};
        memcpy(m.b, targets[t].seed->b, m.n);
        mutate(&m, targets[t].text);
        save(targets[t].name, &m);
        exercise(t == 1 ? "base-000001.vmdk" : t == 2 ? "flat-000001.vmdk" : targets[t].name);
        exercise(targets[t].name);
        save(targets[t].name, targets[t].seed); /* restore */
        free(m.b);
    }
    /* A link naming itself, and a chain deeper than any ESXi keeps. */
    buf_t self = sparse_file(1, child_has, "fz.vmdk", 0x55555555, 0x55555555, "fz.vmdk");
    save("fz.vmdk", &self);
    vmdk_disk_t *d;
    if (open_at("fz.vmdk", 0, &d) != VIX_E_DISK_INVALIDDISK) fail("a self-parent was not refused");

    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf -- '%s'", dir);
    if (system(cmd) != 0) fail("cannot remove %s", dir);
    free(base.b), free(child.b), free(flat.b), free(flatdesc.b), free(fchild.b), free(self.b);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ms = (long)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
    printf("vmdkfuzz: %s (%d failures, %d mutants, %ld ms)\n", failures ? "FAILED" : "ok", failures,
           iterations, ms);
    return failures ? 1 : 0;
}
