package main

// The -inventory-delay of the IVD inventory queries, done here rather than by vcsim's
// DelayConfig so that a test can see it without a clock: each delayed call writes
// "inventory-delay begin <method>" and "inventory-delay end <method>" to stderr (the
// test bed's vcsim.log), and while the file DIR/inventory.gate of -faults DIR exists a
// delayed call also waits for it to go. Tests then tell delayed from undelayed calls by
// the log, and see delays overlap by holding calls at the gate, whatever the machine's load.
//
// Concurrency: one goroutine per request (net/http); the log lines are single writes.

import (
	"bytes"
	"fmt"
	"io/ioutil"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// The first element inside the SOAP Body is the method.
var soapMethod = regexp.MustCompile(`<(?:[A-Za-z0-9_]+:)?Body[^>]*>\s*<(?:[A-Za-z0-9_]+:)?([A-Za-z0-9_]+)`)

type inventoryDelay struct {
	delay   time.Duration
	methods map[string]bool
	gate    string // "" without -faults
}

func newInventoryDelay(delay time.Duration, faultDir string) *inventoryDelay {
	d := &inventoryDelay{delay: delay, methods: map[string]bool{}}
	for _, m := range inventoryMethods {
		d.methods[m] = true
	}
	if faultDir != "" {
		d.gate = filepath.Join(faultDir, "inventory.gate")
	}
	return d
}

func (d *inventoryDelay) gated() bool {
	if d.gate == "" {
		return false
	}
	_, err := os.Stat(d.gate)
	return err == nil
}

func (d *inventoryDelay) wrap(next http.Handler) http.Handler {
	if d.delay <= 0 {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := ioutil.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		if m := soapMethod.FindSubmatch(body); m != nil && d.methods[string(m[1])] {
			method := string(m[1])
			fmt.Fprintf(os.Stderr, "inventory-delay begin %s\n", method)
			time.Sleep(d.delay)
			for d.gated() {
				time.Sleep(2 * time.Millisecond)
			}
			fmt.Fprintf(os.Stderr, "inventory-delay end %s\n", method)
		}
		next.ServeHTTP(w, r)
	})
}
