package main

// Injected task failures, switched on and off by a test while the launcher runs:
// with -faults DIR, every task of operation OP (createSnapshot, deleteSnapshot)
// ends in a SystemError fault while the file DIR/OP exists, for vCenter and ESX
// alike. Which fault a real vCenter gives depends on the cause (a locked file, a
// datastore gone, an internal error); SystemError is the one any cause can give,
// and no client may treat it as "not found".
//
// Lost replies: while DIR/OP.lost-reply exists, the next request that starts an
// OP task (createSnapshot, deleteSnapshot; vim and host wire names alike) is
// served in full, so its task runs and ends, and then the connection is closed
// without a byte of reply, as when a reply is lost on the way back (a network
// failure, a proxy or load balancer timing out). The file is removed when that
// happens: one request each time a test creates it.
//
// Concurrency: a stat per call; the test creates and removes the files. Removing
// a .lost-reply file is what arms it, so two requests cannot both take one.

import (
	"bytes"
	"io/ioutil"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// lostReplyOps maps what a request body names to the operation's switch.
var lostReplyOps = []struct{ method, op string }{
	{"CreateSnapshot_Task", "createSnapshot"},
	{"DeleteSnapshot_Task", "deleteSnapshot"},
}

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

// lostReply wraps a SOAP handler with the lost-reply switches (see above).
func (f faults) lostReply(next http.Handler) http.Handler {
	if f.dir == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !f.anyLostReply() {
			next.ServeHTTP(w, r)
			return
		}
		body, err := ioutil.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		hijacker, canHijack := w.(http.Hijacker)
		if !canHijack || !f.takeLostReply(body) {
			next.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(&discardWriter{header: http.Header{}}, r)
		if conn, _, err := hijacker.Hijack(); err == nil {
			conn.Close()
		}
	})
}

func (f faults) anyLostReply() bool {
	for _, o := range lostReplyOps {
		if _, err := os.Stat(filepath.Join(f.dir, o.op+".lost-reply")); err == nil {
			return true
		}
	}
	return false
}

// takeLostReply reports whether this request starts an operation whose
// lost-reply switch is set, and clears the switch if so.
func (f faults) takeLostReply(body []byte) bool {
	for _, o := range lostReplyOps {
		if bytes.Contains(body, []byte(o.method)) {
			return os.Remove(filepath.Join(f.dir, o.op+".lost-reply")) == nil
		}
	}
	return false
}

// discardWriter takes a reply that will never be sent.
type discardWriter struct{ header http.Header }

func (d *discardWriter) Header() http.Header         { return d.header }
func (d *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (d *discardWriter) WriteHeader(int)             {}
