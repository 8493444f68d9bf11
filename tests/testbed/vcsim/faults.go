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
	"time"

	"github.com/vmware/govmomi/simulator"
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

// held: while DIR/<op>.hold exists, a new task of that operation stays queued (the
// SOAP call returns the task at once, as real vCenter does) and runs only once the file
// is gone: a test can look at the world, or kill the client, while the task is under way.
func (f faults) held(op string) bool {
	if f.dir == "" {
		return false
	}
	_, err := os.Stat(filepath.Join(f.dir, op+".hold"))
	return err == nil
}

// runTask runs the task now, or (while held) in the background once released.
func (f faults) runTask(op string, task *simulator.Task) types.ManagedObjectReference {
	if !f.held(op) {
		return task.Run()
	}
	go func() {
		for f.held(op) {
			time.Sleep(5 * time.Millisecond)
		}
		task.Run()
	}()
	return task.Self
}
