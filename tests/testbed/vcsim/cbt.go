package main

// Changed block tracking for IVDs, computed from the stand-in VDDK's images
// (-images DIR, laid out DIR/<ivd-id>/<snapshot-id>.raw as
// tests/testbed/vsphere.py place_image writes them).
//
// Model: CBT is a per-IVD switch (the enableChangedBlockTracking control
// flag). Enabling it starts a new epoch; each snapshot taken while it is on
// gets changedBlockTrackingId "<epoch>/<n>". A query (snapshot S, changeId C)
// compares S's image with the image of the snapshot that carried C, at
// cbtConfig.block granularity: a block is changed when its bytes differ (holes
// read as zeros). changeId "*" reports every block holding allocated data of
// S's image (SEEK_DATA/SEEK_HOLE). Areas are whole blocks, adjacent changed
// blocks are merged, and everything is clipped to the covered span.
//
// Pieces: one call covers at most maxSpan bytes from startOffset and returns
// at most maxAreas areas; when the area limit cuts a span short, length ends
// at the last returned area. The reply's startOffset is the request's and
// startOffset+length is where the next call starts; a caller loops until it
// reaches the capacity. startOffset at or past the capacity (or negative, or
// not a multiple of 512) is InvalidArgument, as real vCenter does at the end.
//
// Faults (not verified against a real vCenter for IVDs; chosen from what is
// reported for VM disks, the stricter where that is unclear):
//   - CBT off for the IVD now, S taken while CBT was off, or S from an epoch
//     that has since been reset: vim.fault.FileFault "Error caused by file
//     <disk path>" (what VMs answer when change tracking is not active).
//   - C unknown, from another IVD, from a reset epoch, or not older than S:
//     vmodl.fault.InvalidArgument (invalidProperty "changeId").
//   - Test-bed misconfiguration (no -images, an image missing): a fault whose
//     message starts "vcsim test bed:", never a silent "no changes".
//
// Concurrency: prepareLocked runs under the store's read lock and copies what
// run needs; run only reads image files.

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	seekData = 3 // SEEK_DATA / SEEK_HOLE (Linux): os.File.Seek passes whence through
	seekHole = 4
)

type cbtConfig struct {
	images   string
	block    int64
	maxAreas int
	maxSpan  int64
}

type cbtQuery struct {
	newer, older string // image paths; older "" for changeId "*"
	capacity     int64
	start        int64
}

func (c *cbtConfig) prepareLocked(v *ivd, snapshotID string, start int64, changeID string) (cbtQuery, *soap.Fault) {
	_, sn := v.findSnapshotLocked(snapshotID)
	if sn == nil {
		return cbtQuery{}, fault(new(types.NotFound))
	}
	capacity := v.capacityMB << 20
	if start < 0 || start >= capacity || start%512 != 0 {
		return cbtQuery{}, faultMsg(fmt.Sprintf("startOffset %d outside the disk (capacity %d)", start, capacity),
			&types.InvalidArgument{InvalidProperty: "startOffset"})
	}
	if !v.cbt || sn.changeID == "" || sn.epoch != v.cbtEpoch {
		path := v.snapshotPath(sn)
		return cbtQuery{}, faultMsg("Error caused by file "+path, &types.FileFault{File: path})
	}
	q := cbtQuery{capacity: capacity, start: start}
	if c.images == "" {
		return cbtQuery{}, faultMsg("vcsim test bed: the launcher was started without -images",
			new(types.NotSupported))
	}
	q.newer = filepath.Join(c.images, v.id, sn.id+".raw")
	if changeID != "*" {
		older := v.changeIDs[changeID]
		if older == nil || older.epoch != v.cbtEpoch || older.seq >= sn.seq {
			return cbtQuery{}, faultMsg(fmt.Sprintf("A specified parameter was not correct: changeId %q", changeID),
				&types.InvalidArgument{InvalidProperty: "changeId"})
		}
		q.older = filepath.Join(c.images, v.id, older.id+".raw")
	}
	return q, nil
}

func openImage(path string) (*os.File, *soap.Fault) {
	f, err := os.Open(path)
	if err != nil {
		return nil, faultMsg(fmt.Sprintf("vcsim test bed: cannot open image %s: %v", path, err),
			&types.FileNotFound{FileFault: types.FileFault{File: path}})
	}
	return f, nil
}

// dataExtents lists the allocated [start, end) ranges of f within [from, to).
func dataExtents(f *os.File, from, to int64) ([][2]int64, error) {
	var out [][2]int64
	for off := from; off < to; {
		d, err := f.Seek(off, seekData)
		if err != nil {
			if err.(*os.PathError).Err == syscall.ENXIO {
				break // no data at or after off
			}
			return nil, err
		}
		if d >= to {
			break
		}
		h, err := f.Seek(d, seekHole)
		if err != nil {
			return nil, err
		}
		if h > to {
			h = to
		}
		out = append(out, [2]int64{d, h})
		off = h
	}
	return out, nil
}

func (c *cbtConfig) run(q cbtQuery) (*types.DiskChangeInfo, *soap.Fault) {
	newer, f := openImage(q.newer)
	if f != nil {
		return nil, f
	}
	defer newer.Close()
	var older *os.File
	if q.older != "" {
		if older, f = openImage(q.older); f != nil {
			return nil, f
		}
		defer older.Close()
	}

	first := q.start / c.block * c.block
	end := first + c.maxSpan
	if end > q.capacity {
		end = q.capacity
	}

	// Blocks that may differ: those touching data in either image.
	candidates := make(map[int64]bool)
	for _, img := range []*os.File{newer, older} {
		if img == nil {
			continue
		}
		ext, err := dataExtents(img, first, end)
		if err != nil {
			return nil, faultMsg("vcsim test bed: "+err.Error(), new(types.FileFault))
		}
		for _, e := range ext {
			for b := e[0] / c.block * c.block; b < e[1]; b += c.block {
				candidates[b] = true
			}
		}
	}

	var changed []int64
	bufA, bufB := make([]byte, c.block), make([]byte, c.block)
	for b := first; b < end; b += c.block {
		if !candidates[b] {
			continue
		}
		if older == nil { // "*": allocated is changed
			changed = append(changed, b)
			continue
		}
		if err := readBlock(newer, b, bufA); err != nil {
			return nil, faultMsg("vcsim test bed: "+err.Error(), new(types.FileFault))
		}
		if err := readBlock(older, b, bufB); err != nil {
			return nil, faultMsg("vcsim test bed: "+err.Error(), new(types.FileFault))
		}
		if !bytes.Equal(bufA, bufB) {
			changed = append(changed, b)
		}
	}

	var areas []types.DiskChangeExtent
	for _, b := range changed {
		s, e := b, b+c.block
		if s < q.start {
			s = q.start
		}
		if e > end {
			e = end
		}
		if n := len(areas); n > 0 && areas[n-1].Start+areas[n-1].Length == s {
			areas[n-1].Length += e - s
		} else {
			areas = append(areas, types.DiskChangeExtent{Start: s, Length: e - s})
		}
	}
	if len(areas) > c.maxAreas {
		areas = areas[:c.maxAreas]
		last := areas[len(areas)-1]
		end = last.Start + last.Length
	}
	return &types.DiskChangeInfo{StartOffset: q.start, Length: end - q.start, ChangedArea: areas}, nil
}

// readBlock reads one block at off; what lies past the end of the file reads as zeros.
func readBlock(f *os.File, off int64, buf []byte) error {
	n, err := f.ReadAt(buf, off)
	if err != nil && err != io.EOF {
		return err
	}
	for i := n; i < len(buf); i++ {
		buf[i] = 0
	}
	return nil
}
