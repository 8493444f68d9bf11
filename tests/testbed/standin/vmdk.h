/*
 * vmdk.h -- the stand-in VDDK's reader of VMDK chains (VDDK's local-file mode).
 *
 * Written from VMware's "Virtual Disk Format 1.1" specification and from the behaviour of the
 * real VDDK 7.0.2 measured on the files it writes (see vmdk.c and README.md). A disk is a chain
 * of links: the file that Open names, then its parents through parentFileNameHint. Every file
 * is opened O_RDONLY and nothing is ever written; the lock files real VDDK makes beside each
 * link are the caller's business (vixdisklib.c, vmdk_link_path).
 *
 * Concurrency: one vmdk_disk_t may be read from several threads at once (grain tables are
 * loaded under a per-extent lock); open and close belong to one thread.
 */
#ifndef IVDFS_STANDIN_VMDK_H
#define IVDFS_STANDIN_VMDK_H

#include <stddef.h>
#include <stdint.h>

#include "vixDiskLib.h"

typedef struct vmdk_disk vmdk_disk_t;

/* Internal to the library: VMware's exports no such names, so neither does the stand-in. */
#pragma GCC visibility push(hidden)

/* 1 when the open file `fd` is a VMDK (a hosted sparse or COWD header, or a text descriptor),
   0 when it is anything else (the stand-in serves such a file as a raw disk). */
int vmdk_probe(int fd);

/* Opens the chain whose top link is `path`; with `single_link`, that link alone. Returns
   VIX_OK or the VixError real VDDK gives for the same fault, and a reason in `why`. */
VixError vmdk_open(const char *path, int single_link, vmdk_disk_t **out, char *why,
                   size_t whylen);

void vmdk_close(vmdk_disk_t *d);

uint64_t vmdk_capacity(const vmdk_disk_t *d); /* sectors, from the top link's descriptor */
int vmdk_num_links(const vmdk_disk_t *d);
/* The file of link `i` (0: the one Open named, then its parents), as opened. */
const char *vmdk_link_path(const vmdk_disk_t *d, int i);
/* What GetInfo reports: the bottom link's parentFileNameHint (NULL for a complete chain; the
   opened link's own hint with single_link). */
const char *vmdk_parent_hint(const vmdk_disk_t *d);

/* Reads sectors [start, start + n), which the caller has checked are inside the disk. */
VixError vmdk_read(vmdk_disk_t *d, uint64_t start, uint64_t n, uint8_t *buf);

/* The chunk-aligned runs of [start, start + n) that hold allocated grains (in any link, or in
   the top link alone with single_link), adjacent runs joined. The caller has checked the
   arguments against QueryAllocatedBlocks' rules; *runs is malloc'ed (NULL when none). */
VixError vmdk_query_allocated(vmdk_disk_t *d, uint64_t start, uint64_t n, uint64_t chunk,
                              VixDiskLibBlock **runs, size_t *nruns);

/* GetErrorText's words for the errors above that only VMDKs give (VDDK 7.0.2's), or NULL. */
const char *vmdk_error_text(unsigned code);

#pragma GCC visibility pop

#endif
