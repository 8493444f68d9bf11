package main

// Injected task failures, switched on and off by a test while the launcher runs:
// with -faults DIR, every task of operation OP (createSnapshot, deleteSnapshot)
// ends in a SystemError fault while the file DIR/OP exists, for vCenter and ESX
// alike. Which fault a real vCenter gives depends on the cause (a locked file, a
// datastore gone, an internal error); SystemError is the one any cause can give,
// and no client may treat it as "not found".
//
// Concurrency: a stat per call; the test creates and removes the files.

import (
	"os"
	"path/filepath"

	"github.com/vmware/govmomi/vim25/types"
)

type faults struct {
	dir string // "" when -faults was not given
}

func (f faults) injected(op string) types.BaseMethodFault {
	if f.dir == "" {
		return nil
	}
	if _, err := os.Stat(filepath.Join(f.dir, op)); err != nil {
		return nil
	}
	return &types.SystemError{Reason: "vcsim test bed: injected " + op + " failure"}
}

// missing: while DIR/<method>.missing exists, the method answers MethodNotFound, as on a
// server of a release that lacks it (an optional call a client must do without).
func (f faults) missing(method string) bool {
	if f.dir == "" {
		return false
	}
	_, err := os.Stat(filepath.Join(f.dir, method+".missing"))
	return err == nil
}
