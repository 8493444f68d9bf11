package main

// -populate: build a bed of IVDs at start-up through the same store calls that
// CreateDisk_Task, SetVStorageObjectControlFlags and
// VStorageObjectCreateSnapshot_Task make, so a client cannot tell them apart
// from IVDs made over SOAP; only names, capacities, datastores, times,
// descriptions and attachments come from the spec. Ids are generated here, as
// vCenter generates them, and written to -populated for the test to read.
//
// Spec (JSON; unknown keys are an error):
//   {"ivds": [{"name": "pv-1", "capacityMB": 1024, "datastore": "LocalDS_0",
//              "createTime": "2024-05-01T10:00:00Z",      (optional; default: now)
//              "cbt": true,                                 (optional)
//              "snapshots": [{"description": "daily",
//                             "createTime": "2024-05-02T00:00:00Z"}],
//              "attachments": [{"vmId": "vm-1001", "diskKey": 2000}]}]}
// Result: a JSON array, one object per spec entry in order:
//   {"id", "name", "datastore", "datastoreMoref", "capacityMB", "createTime",
//    "cbt", "snapshots": [{"id", "description", "createTime", "changeId"}]}
//
// Concurrency: runs once before the server starts listening.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/ioutil"
	"os"
	"path/filepath"
	"time"
)

type populateSnapshot struct {
	Description string     `json:"description"`
	CreateTime  *time.Time `json:"createTime"`
}

type populateIVD struct {
	Name        string             `json:"name"`
	CapacityMB  int64              `json:"capacityMB"`
	Datastore   string             `json:"datastore"`
	CreateTime  *time.Time         `json:"createTime"`
	CBT         bool               `json:"cbt"`
	Snapshots   []populateSnapshot `json:"snapshots"`
	Attachments []attachment       `json:"attachments"`
}

type populatedSnapshot struct {
	ID          string    `json:"id"`
	Description string    `json:"description"`
	CreateTime  time.Time `json:"createTime"`
	ChangeID    string    `json:"changeId"`
}

type populatedIVD struct {
	ID             string              `json:"id"`
	Name           string              `json:"name"`
	Datastore      string              `json:"datastore"`
	DatastoreMoref string              `json:"datastoreMoref"`
	CapacityMB     int64               `json:"capacityMB"`
	CreateTime     time.Time           `json:"createTime"`
	CBT            bool                `json:"cbt"`
	Snapshots      []populatedSnapshot `json:"snapshots"`
}

func populate(st *store, specFile, resultFile string) error {
	raw, err := ioutil.ReadFile(specFile)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var spec struct {
		IVDs []populateIVD `json:"ivds"`
	}
	if err := dec.Decode(&spec); err != nil {
		return fmt.Errorf("%s: %v", specFile, err)
	}

	st.mu.Lock()
	defer st.mu.Unlock()
	out := make([]populatedIVD, 0, len(spec.IVDs))
	for i, p := range spec.IVDs {
		if p.CapacityMB < 1 {
			return fmt.Errorf("%s: ivds[%d]: capacityMB must be at least 1", specFile, i)
		}
		ds, err := datastoreByName(p.Datastore)
		if err != nil {
			return fmt.Errorf("%s: ivds[%d]: %v", specFile, i, err)
		}
		created := time.Now()
		if p.CreateTime != nil {
			created = *p.CreateTime
		}
		v := st.createLocked(ds, p.Name, p.CapacityMB, "thin", nil, created)
		v.setCBTLocked(p.CBT)
		v.attachments = p.Attachments
		r := populatedIVD{ID: v.id, Name: v.name, Datastore: ds.Name, DatastoreMoref: ds.Self.Value,
			CapacityMB: v.capacityMB, CreateTime: v.created, CBT: v.cbt, Snapshots: []populatedSnapshot{}}
		for _, s := range p.Snapshots {
			t := time.Now()
			if s.CreateTime != nil {
				t = *s.CreateTime
			}
			sn := v.snapshotLocked(s.Description, t)
			r.Snapshots = append(r.Snapshots, populatedSnapshot{ID: sn.id, Description: sn.description,
				CreateTime: sn.created, ChangeID: sn.changeID})
		}
		out = append(out, r)
	}

	data, err := json.Marshal(out)
	if err != nil {
		return err
	}
	// Written whole under a temporary name, then renamed: a reader never sees half.
	tmp := filepath.Join(filepath.Dir(resultFile), "."+filepath.Base(resultFile)+".tmp")
	if err := ioutil.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, resultFile)
}
