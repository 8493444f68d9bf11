package main

// The IVD state behind every manager the launcher serves: the vim
// VcenterVStorageObjectManager, the ESX HostVStorageObjectManager and the VSLM
// VslmVStorageObjectManager all read and change one store, so an IVD made
// through one is seen by the others exactly as vCenter's global catalog would
// show it.
//
// Disk files: each IVD has a chain of links in its datastore's fcd/ folder,
// named as ESXi names an FCD's files: <stem>.vmdk, <stem>-000001.vmdk, ...
// The stem is 32 random hex digits, unrelated to the IVD's id (as on ESXi:
// clients must ask for paths, never build them). The newest link is the
// running disk (the IVD's backing filePath); a snapshot freezes the running
// link (its RetrieveSnapshotDetails path) and starts a new one, with the lowest
// number no link of the IVD has. Deleting a snapshot consolidates: the link
// after the snapshot's is merged into the snapshot's link and removed, and
// whatever used it (the next snapshot, or the running disk) uses the snapshot's
// link from then on. This is how ESXi commits a VM snapshot's delta into its
// parent; for FCDs it is assumed the same (not observed on a real ESXi).
//
// Concurrency: the simulator serialises calls per managed object only, and
// the managers are distinct objects, so every store access holds store.mu.
// Methods named *Locked expect the caller to hold it; the others take it.

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type snapshot struct {
	id          string
	backingID   string
	description string
	created     time.Time
	changeID    string // "" when CBT was off as it was taken
	epoch       string // the IVD's CBT epoch at the time, and the change sequence in it
	seq         int
	file        string // the link it froze, in fcd/ (RetrieveSnapshotDetails' path)
}

type attachment struct {
	VMID    string `json:"vmId"`
	DiskKey int32  `json:"diskKey"`
}

type ivd struct {
	id           string
	name         string
	created      time.Time
	capacityMB   int64
	ds           types.ManagedObjectReference
	dsName       string
	stem         string   // the chain's file names: <stem>.vmdk, <stem>-000001.vmdk, ...
	links        []string // file names in fcd/, base first; the last is the running disk
	backingID    string
	provisioning string
	keepAfterVM  *bool
	noRelocation bool
	cbt          bool
	cbtEpoch     string // a new one each time CBT is enabled: older change ids become invalid
	cbtSeq       int
	snaps        []*snapshot
	attachments  []attachment
	// Every change id this IVD's snapshots ever had, so that a query "since
	// change id X" still works after the snapshot that carried X is deleted
	// (real CBT ids outlive snapshots; only a CBT reset invalidates them).
	changeIDs map[string]*snapshot
}

type store struct {
	mu   sync.RWMutex
	byDS map[types.ManagedObjectReference]map[string]*ivd
	byID map[string]*ivd
}

func newStore() *store {
	return &store{
		byDS: make(map[types.ManagedObjectReference]map[string]*ivd),
		byID: make(map[string]*ivd),
	}
}

// datastore resolves a moref argument the way VMOMI does: an unknown moref is
// ManagedObjectNotFound.
func datastore(ref types.ManagedObjectReference) (*simulator.Datastore, types.BaseMethodFault) {
	if ds, ok := simulator.Map.Get(ref).(*simulator.Datastore); ok {
		return ds, nil
	}
	return nil, &types.ManagedObjectNotFound{Obj: ref}
}

func datastoreByName(name string) (*simulator.Datastore, error) {
	var names []string
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		if ds.Name == name {
			return ds, nil
		}
		names = append(names, ds.Name)
	}
	return nil, fmt.Errorf("no datastore %q (have %s)", name, strings.Join(names, ", "))
}

// createLocked makes an IVD the way vcsim's CreateDisk_Task did (same fields),
// but with ESXi's file naming ("[ds] fcd/<32 hex digits>.vmdk", not the id).
// Unlike vcsim it writes no empty descriptor files on the datastore directory:
// nothing reads them, and 10,000 file creations made a 5,000-IVD bed take
// seconds on a busy disk (tests/testbed/vsphere.py writes chains on demand).
func (s *store) createLocked(ds *simulator.Datastore, name string, capacityMB int64,
	provisioning string, keepAfterVM *bool, created time.Time) *ivd {
	id := uuid.New().String()
	var stem [16]byte
	_, _ = rand.Read(stem[:])
	v := &ivd{
		id:           id,
		name:         name,
		created:      created.Truncate(time.Microsecond), // what a client can see of it
		capacityMB:   capacityMB,
		ds:           ds.Self,
		dsName:       ds.Name,
		stem:         hex.EncodeToString(stem[:]),
		backingID:    uuid.New().String(),
		provisioning: provisioning,
		keepAfterVM:  keepAfterVM,
		changeIDs:    make(map[string]*snapshot),
	}
	v.links = []string{v.stem + ".vmdk"}
	if s.byDS[ds.Self] == nil {
		s.byDS[ds.Self] = make(map[string]*ivd)
	}
	s.byDS[ds.Self][id] = v
	s.byID[id] = v
	return v
}

// getLocked finds an IVD by id on one datastore (the vim and host API address
// an IVD by both; the right id on the wrong datastore is not found).
func (s *store) getLocked(ds types.ManagedObjectReference, id string) *ivd {
	return s.byDS[ds][id]
}

func (s *store) deleteLocked(v *ivd) {
	delete(s.byDS[v.ds], v.id)
	delete(s.byID, v.id)
}

// listLocked returns the ids on one datastore in map order, i.e. in no
// particular order, like vcsim did: clients must not rely on one.
func (s *store) listLocked(ds types.ManagedObjectReference) []types.ID {
	ids := make([]types.ID, 0, len(s.byDS[ds]))
	for id := range s.byDS[ds] {
		ids = append(ids, types.ID{Id: id})
	}
	return ids
}

// sortedLocked returns every IVD ordered by id (the VSLM global catalog order).
func (s *store) sortedLocked() []*ivd {
	all := make([]*ivd, 0, len(s.byID))
	for _, v := range s.byID {
		all = append(all, v)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].id < all[j].id })
	return all
}

// changeIDFormat mimics VMware's "52 1f ... 3c-9a ... 07/<n>": the epoch is
// 16 random bytes printed as two spaced 8-byte halves, then a sequence.
func newCBTEpoch() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	half := func(p []byte) string {
		parts := make([]string, len(p))
		for i, x := range p {
			parts[i] = fmt.Sprintf("%02x", x)
		}
		return strings.Join(parts, " ")
	}
	return half(b[:8]) + "-" + half(b[8:])
}

func (v *ivd) setCBTLocked(on bool) {
	switch {
	case on && !v.cbt:
		v.cbt, v.cbtEpoch, v.cbtSeq = true, newCBTEpoch(), 0
	case !on && v.cbt:
		v.cbt, v.cbtEpoch = false, ""
	}
}

// datastorePath is a file of the IVD's chain as vSphere names it.
func (v *ivd) datastorePath(file string) string {
	return fmt.Sprintf("[%s] fcd/%s", v.dsName, file)
}

// backingPath is the running disk: the newest link.
func (v *ivd) backingPath() string { return v.datastorePath(v.links[len(v.links)-1]) }

func (v *ivd) snapshotPath(sn *snapshot) string { return v.datastorePath(sn.file) }

// newLinkName is <stem>-NNNNNN.vmdk with the lowest number no link has.
func (v *ivd) newLinkName() string {
	for n := 1; ; n++ {
		name := fmt.Sprintf("%s-%06d.vmdk", v.stem, n)
		used := false
		for _, l := range v.links {
			used = used || l == name
		}
		if !used {
			return name
		}
	}
}

func (v *ivd) snapshotLocked(description string, created time.Time) *snapshot {
	sn := &snapshot{
		id:          uuid.New().String(),
		backingID:   uuid.New().String(),
		description: description,
		created:     created.Truncate(time.Microsecond),
		file:        v.links[len(v.links)-1],
	}
	v.links = append(v.links, v.newLinkName())
	if v.cbt {
		v.cbtSeq++
		sn.epoch, sn.seq = v.cbtEpoch, v.cbtSeq
		sn.changeID = fmt.Sprintf("%s/%d", v.cbtEpoch, v.cbtSeq)
		v.changeIDs[sn.changeID] = sn
	}
	v.snaps = append(v.snaps, sn)
	return sn
}

// deleteSnapshotLocked removes snaps[i] and consolidates its link's child into
// its link (see the top of this file).
func (v *ivd) deleteSnapshotLocked(i int) {
	sn := v.snaps[i]
	v.snaps = append(v.snaps[:i], v.snaps[i+1:]...)
	for k, l := range v.links {
		if l != sn.file || k+1 == len(v.links) {
			continue
		}
		child := v.links[k+1]
		v.links = append(v.links[:k+1], v.links[k+2:]...)
		for _, other := range v.snaps {
			if other.file == child {
				other.file = sn.file
			}
		}
		return
	}
}

func (v *ivd) findSnapshotLocked(id string) (int, *snapshot) {
	for i, sn := range v.snaps {
		if sn.id == id {
			return i, sn
		}
	}
	return -1, nil
}

// object renders the IVD exactly as vcsim 0.24's CreateDisk_Task did.
func (v *ivd) object() types.VStorageObject {
	cbt := v.cbt
	return types.VStorageObject{
		Config: types.VStorageObjectConfigInfo{
			BaseConfigInfo: types.BaseConfigInfo{
				Id:                          types.ID{Id: v.id},
				Name:                        v.name,
				CreateTime:                  v.created,
				KeepAfterDeleteVm:           v.keepAfterVM,
				RelocationDisabled:          types.NewBool(v.noRelocation),
				NativeSnapshotSupported:     types.NewBool(false),
				ChangedBlockTrackingEnabled: &cbt,
				Backing: &types.BaseConfigInfoDiskFileBackingInfo{
					BaseConfigInfoFileBackingInfo: types.BaseConfigInfoFileBackingInfo{
						BaseConfigInfoBackingInfo: types.BaseConfigInfoBackingInfo{Datastore: v.ds},
						FilePath:                  v.backingPath(),
						BackingObjectId:           v.backingID,
					},
					ProvisioningType: v.provisioning,
				},
			},
			CapacityInMB:    v.capacityMB,
			ConsumptionType: []string{"disk"},
		},
	}
}

func (v *ivd) snapshotInfo() types.VStorageObjectSnapshotInfo {
	info := types.VStorageObjectSnapshotInfo{}
	for _, sn := range v.snaps {
		info.Snapshots = append(info.Snapshots, types.VStorageObjectSnapshotInfoVStorageObjectSnapshot{
			Id:              &types.ID{Id: sn.id},
			BackingObjectId: sn.backingID,
			CreateTime:      sn.created,
			Description:     sn.description,
		})
	}
	return info
}

func (v *ivd) snapshotDetails(sn *snapshot) types.VStorageObjectSnapshotDetails {
	return types.VStorageObjectSnapshotDetails{Path: v.snapshotPath(sn), ChangedBlockTrackingId: sn.changeID}
}

// setControlFlagsLocked applies Set/ClearVStorageObjectControlFlags. Only
// enableChangedBlockTracking has an effect beyond the config flags it sets;
// unknown flags are InvalidArgument.
func (v *ivd) setControlFlagsLocked(flags []string, on bool) types.BaseMethodFault {
	for _, f := range flags {
		switch types.VslmVStorageObjectControlFlag(f) {
		case types.VslmVStorageObjectControlFlagEnableChangedBlockTracking:
			v.setCBTLocked(on)
		case types.VslmVStorageObjectControlFlagKeepAfterDeleteVm:
			v.keepAfterVM = types.NewBool(on)
		case types.VslmVStorageObjectControlFlagDisableRelocation:
			v.noRelocation = on
		default:
			return &types.InvalidArgument{InvalidProperty: "controlFlags"}
		}
	}
	return nil
}
