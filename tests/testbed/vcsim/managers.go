package main

// The vim-side managers: VcenterVStorageObjectManager (vCenter mode) and
// HostVStorageObjectManager (ESX mode, absent from vcsim 0.24). Both are thin
// wire adapters over one set of operations on the shared store, so the two
// modes behave the same wherever the API is the same. Faults for a missing
// IVD keep vcsim 0.24's choices (NotFound from RetrieveVStorageObject,
// InvalidArgument from the snapshot and delete calls) so existing clients see
// what they saw before; the methods vcsim lacked answer NotFound.
//
// Concurrency: the simulator serialises calls per manager; the store has its
// own lock because the managers share it; tasks run synchronously.

import (
	"fmt"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type ops struct {
	st     *store
	cbt    *cbtConfig
	faults faults
}

func fault(f types.BaseMethodFault) *soap.Fault { return simulator.Fault("", f) }

func faultMsg(msg string, f types.BaseMethodFault) *soap.Fault { return simulator.Fault(msg, f) }

func (o *ops) createDisk(spec types.VslmCreateSpec) (*types.VStorageObject, types.BaseMethodFault) {
	backing, ok := spec.BackingSpec.(*types.VslmCreateSpecDiskFileBackingSpec)
	if !ok {
		return nil, &types.InvalidArgument{InvalidProperty: "spec.backingSpec"}
	}
	ds, f := datastore(backing.Datastore)
	if f != nil {
		return nil, f
	}
	o.st.mu.Lock()
	defer o.st.mu.Unlock()
	v := o.st.createLocked(ds, spec.Name, spec.CapacityInMB, backing.ProvisioningType,
		spec.KeepAfterDeleteVm, time.Now())
	obj := v.object()
	return &obj, nil
}

func (o *ops) deleteDisk(ds types.ManagedObjectReference, id types.ID) types.BaseMethodFault {
	o.st.mu.Lock()
	defer o.st.mu.Unlock()
	v := o.st.getLocked(ds, id.Id)
	if v == nil {
		return new(types.InvalidArgument)
	}
	o.st.deleteLocked(v)
	return nil
}

// list answers an unknown datastore moref with an empty list, as vcsim 0.24 did
// (real vCenter would say ManagedObjectNotFound). Kept because
// Vcsim.restart_server gives the datastores new morefs, unlike a real restart,
// and clients holding the old ones must see the "empty inventory" it promises.
func (o *ops) list(ds types.ManagedObjectReference) ([]types.ID, types.BaseMethodFault) {
	o.st.mu.RLock()
	defer o.st.mu.RUnlock()
	return o.st.listLocked(ds), nil
}

func (o *ops) retrieve(ds types.ManagedObjectReference, id types.ID) (*types.VStorageObject, types.BaseMethodFault) {
	o.st.mu.RLock()
	defer o.st.mu.RUnlock()
	v := o.st.getLocked(ds, id.Id)
	if v == nil {
		return nil, new(types.NotFound)
	}
	obj := v.object()
	return &obj, nil
}

func (o *ops) rename(ds types.ManagedObjectReference, id types.ID, name string) types.BaseMethodFault {
	o.st.mu.Lock()
	defer o.st.mu.Unlock()
	v := o.st.getLocked(ds, id.Id)
	if v == nil {
		return new(types.NotFound)
	}
	v.name = name
	return nil
}

func (o *ops) snapshotInfo(ds types.ManagedObjectReference, id types.ID) (*types.VStorageObjectSnapshotInfo, types.BaseMethodFault) {
	o.st.mu.RLock()
	defer o.st.mu.RUnlock()
	v := o.st.getLocked(ds, id.Id)
	if v == nil {
		return nil, new(types.InvalidArgument)
	}
	info := v.snapshotInfo()
	return &info, nil
}

func (o *ops) createSnapshot(ds types.ManagedObjectReference, id types.ID, description string) (*types.ID, types.BaseMethodFault) {
	if f := o.faults.injected("createSnapshot"); f != nil {
		return nil, f
	}
	o.st.mu.Lock()
	defer o.st.mu.Unlock()
	v := o.st.getLocked(ds, id.Id)
	if v == nil {
		return nil, new(types.InvalidArgument)
	}
	sn := v.snapshotLocked(description, time.Now())
	return &types.ID{Id: sn.id}, nil
}

func (o *ops) deleteSnapshot(ds types.ManagedObjectReference, id, snapshotID types.ID) types.BaseMethodFault {
	if f := o.faults.injected("deleteSnapshot"); f != nil {
		return f
	}
	o.st.mu.Lock()
	defer o.st.mu.Unlock()
	v := o.st.getLocked(ds, id.Id)
	if v == nil {
		return new(types.InvalidArgument)
	}
	i, _ := v.findSnapshotLocked(snapshotID.Id)
	if i < 0 {
		return new(types.InvalidArgument)
	}
	v.deleteSnapshotLocked(i)
	return nil
}

func (o *ops) snapshotDetails(ds types.ManagedObjectReference, id, snapshotID types.ID) (*types.VStorageObjectSnapshotDetails, types.BaseMethodFault) {
	o.st.mu.RLock()
	defer o.st.mu.RUnlock()
	v := o.st.getLocked(ds, id.Id)
	if v == nil {
		return nil, new(types.NotFound)
	}
	_, sn := v.findSnapshotLocked(snapshotID.Id)
	if sn == nil {
		return nil, new(types.NotFound)
	}
	d := v.snapshotDetails(sn)
	return &d, nil
}

func (o *ops) controlFlags(ds types.ManagedObjectReference, id types.ID, flags []string, on bool) types.BaseMethodFault {
	o.st.mu.Lock()
	defer o.st.mu.Unlock()
	v := o.st.getLocked(ds, id.Id)
	if v == nil {
		return new(types.NotFound)
	}
	return v.setControlFlagsLocked(flags, on)
}

func (o *ops) changedAreas(ds types.ManagedObjectReference, id, snapshotID types.ID, start int64, changeID string) (*types.DiskChangeInfo, *soap.Fault) {
	o.st.mu.RLock()
	v := o.st.getLocked(ds, id.Id)
	var q cbtQuery
	var f *soap.Fault
	if v == nil {
		f = fault(new(types.NotFound))
	} else {
		q, f = o.cbt.prepareLocked(v, snapshotID.Id, start, changeID)
	}
	o.st.mu.RUnlock()
	if f != nil {
		return nil, f
	}
	// The images are read without the store lock: a comparison may take a while.
	return o.cbt.run(q)
}

// -- vCenter ---------------------------------------------------------------------------

type vcenterManager struct {
	mo.VcenterVStorageObjectManager
	ops
}

func (m *vcenterManager) CreateDiskTask(req *types.CreateDisk_Task) soap.HasFault {
	task := simulator.CreateTask(m, "createDisk", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return m.createDisk(req.Spec)
	})
	return &methods.CreateDisk_TaskBody{Res: &types.CreateDisk_TaskResponse{Returnval: task.Run()}}
}

func (m *vcenterManager) DeleteVStorageObjectTask(req *types.DeleteVStorageObject_Task) soap.HasFault {
	task := simulator.CreateTask(m, "deleteDisk", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, m.deleteDisk(req.Datastore, req.Id)
	})
	return &methods.DeleteVStorageObject_TaskBody{Res: &types.DeleteVStorageObject_TaskResponse{Returnval: task.Run()}}
}

func (m *vcenterManager) ListVStorageObject(req *types.ListVStorageObject) soap.HasFault {
	body := new(methods.ListVStorageObjectBody)
	if ids, f := m.list(req.Datastore); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &types.ListVStorageObjectResponse{Returnval: ids}
	}
	return body
}

func (m *vcenterManager) RetrieveVStorageObject(req *types.RetrieveVStorageObject) soap.HasFault {
	body := new(methods.RetrieveVStorageObjectBody)
	if obj, f := m.retrieve(req.Datastore, req.Id); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &types.RetrieveVStorageObjectResponse{Returnval: *obj}
	}
	return body
}

func (m *vcenterManager) RenameVStorageObject(req *types.RenameVStorageObject) soap.HasFault {
	body := new(methods.RenameVStorageObjectBody)
	if f := m.rename(req.Datastore, req.Id, req.Name); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = new(types.RenameVStorageObjectResponse)
	}
	return body
}

func (m *vcenterManager) RetrieveSnapshotInfo(req *types.RetrieveSnapshotInfo) soap.HasFault {
	body := new(methods.RetrieveSnapshotInfoBody)
	if info, f := m.snapshotInfo(req.Datastore, req.Id); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &types.RetrieveSnapshotInfoResponse{Returnval: *info}
	}
	return body
}

func (m *vcenterManager) VStorageObjectCreateSnapshotTask(req *types.VStorageObjectCreateSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(m, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return m.createSnapshot(req.Datastore, req.Id, req.Description)
	})
	return &methods.VStorageObjectCreateSnapshot_TaskBody{
		Res: &types.VStorageObjectCreateSnapshot_TaskResponse{Returnval: m.faults.runTask("createSnapshot", task)},
	}
}

func (m *vcenterManager) DeleteSnapshotTask(req *types.DeleteSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(m, "deleteSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, m.deleteSnapshot(req.Datastore, req.Id, req.SnapshotId)
	})
	return &methods.DeleteSnapshot_TaskBody{Res: &types.DeleteSnapshot_TaskResponse{Returnval: task.Run()}}
}

func (m *vcenterManager) RetrieveSnapshotDetails(req *types.RetrieveSnapshotDetails) soap.HasFault {
	body := new(methods.RetrieveSnapshotDetailsBody)
	if d, f := m.snapshotDetails(req.Datastore, req.Id, req.SnapshotId); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &types.RetrieveSnapshotDetailsResponse{Returnval: *d}
	}
	return body
}

func (m *vcenterManager) VstorageObjectVCenterQueryChangedDiskAreas(req *types.VstorageObjectVCenterQueryChangedDiskAreas) soap.HasFault {
	body := new(methods.VstorageObjectVCenterQueryChangedDiskAreasBody)
	if info, f := m.changedAreas(req.Datastore, req.Id, req.SnapshotId, req.StartOffset, req.ChangeId); f != nil {
		body.Fault_ = f
	} else {
		body.Res = &types.VstorageObjectVCenterQueryChangedDiskAreasResponse{Returnval: *info}
	}
	return body
}

func (m *vcenterManager) SetVStorageObjectControlFlags(req *types.SetVStorageObjectControlFlags) soap.HasFault {
	body := new(methods.SetVStorageObjectControlFlagsBody)
	if f := m.controlFlags(req.Datastore, req.Id, req.ControlFlags, true); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = new(types.SetVStorageObjectControlFlagsResponse)
	}
	return body
}

func (m *vcenterManager) ClearVStorageObjectControlFlags(req *types.ClearVStorageObjectControlFlags) soap.HasFault {
	body := new(methods.ClearVStorageObjectControlFlagsBody)
	if f := m.controlFlags(req.Datastore, req.Id, req.ControlFlags, false); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = new(types.ClearVStorageObjectControlFlagsResponse)
	}
	return body
}

// RetrieveVStorageObjectAssociations is the vim (6.7) batch call: one entry
// per requested (id, datastore), with a per-entry NotFound fault.
func (m *vcenterManager) RetrieveVStorageObjectAssociations(req *types.RetrieveVStorageObjectAssociations) soap.HasFault {
	if m.faults.missing("RetrieveVStorageObjectAssociations") {
		return &methods.RetrieveVStorageObjectAssociationsBody{Fault_: simulator.Fault("",
			&types.MethodNotFound{Receiver: m.Self, Method: "RetrieveVStorageObjectAssociations"})}
	}
	m.st.mu.RLock()
	defer m.st.mu.RUnlock()
	res := &types.RetrieveVStorageObjectAssociationsResponse{}
	for _, spec := range req.Ids {
		a := types.VStorageObjectAssociations{Id: spec.Id}
		if v := m.st.getLocked(spec.Datastore, spec.Id.Id); v == nil {
			a.Fault = &types.LocalizedMethodFault{
				Fault:            new(types.NotFound),
				LocalizedMessage: fmt.Sprintf("virtual storage object %s not found", spec.Id.Id),
			}
		} else {
			for _, at := range v.attachments {
				a.VmDiskAssociations = append(a.VmDiskAssociations,
					types.VStorageObjectAssociationsVmDiskAssociations{VmId: at.VMID, DiskKey: at.DiskKey})
			}
		}
		res.Returnval = append(res.Returnval, a)
	}
	return &methods.RetrieveVStorageObjectAssociationsBody{Res: res}
}

// -- ESX host --------------------------------------------------------------------------

// hostManager is HostVStorageObjectManager. The host API has no
// RetrieveSnapshotDetails and no QueryChangedDiskAreas for IVDs (pyVmomi 9
// lists none), so neither is served here: a client gets MethodNotFound.
type hostManager struct {
	mo.HostVStorageObjectManager
	ops
}

func (m *hostManager) HostCreateDiskTask(req *types.HostCreateDisk_Task) soap.HasFault {
	task := simulator.CreateTask(m, "createDisk", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return m.createDisk(req.Spec)
	})
	return &methods.HostCreateDisk_TaskBody{Res: &types.HostCreateDisk_TaskResponse{Returnval: task.Run()}}
}

func (m *hostManager) HostDeleteVStorageObjectTask(req *types.HostDeleteVStorageObject_Task) soap.HasFault {
	task := simulator.CreateTask(m, "deleteDisk", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, m.deleteDisk(req.Datastore, req.Id)
	})
	return &methods.HostDeleteVStorageObject_TaskBody{
		Res: &types.HostDeleteVStorageObject_TaskResponse{Returnval: task.Run()},
	}
}

func (m *hostManager) HostListVStorageObject(req *types.HostListVStorageObject) soap.HasFault {
	body := new(methods.HostListVStorageObjectBody)
	if ids, f := m.list(req.Datastore); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &types.HostListVStorageObjectResponse{Returnval: ids}
	}
	return body
}

func (m *hostManager) HostRetrieveVStorageObject(req *types.HostRetrieveVStorageObject) soap.HasFault {
	body := new(methods.HostRetrieveVStorageObjectBody)
	if obj, f := m.retrieve(req.Datastore, req.Id); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &types.HostRetrieveVStorageObjectResponse{Returnval: *obj}
	}
	return body
}

func (m *hostManager) HostRenameVStorageObject(req *types.HostRenameVStorageObject) soap.HasFault {
	body := new(methods.HostRenameVStorageObjectBody)
	if f := m.rename(req.Datastore, req.Id, req.Name); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = new(types.HostRenameVStorageObjectResponse)
	}
	return body
}

func (m *hostManager) HostVStorageObjectRetrieveSnapshotInfo(req *types.HostVStorageObjectRetrieveSnapshotInfo) soap.HasFault {
	body := new(methods.HostVStorageObjectRetrieveSnapshotInfoBody)
	if info, f := m.snapshotInfo(req.Datastore, req.Id); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &types.HostVStorageObjectRetrieveSnapshotInfoResponse{Returnval: *info}
	}
	return body
}

func (m *hostManager) HostVStorageObjectCreateSnapshotTask(req *types.HostVStorageObjectCreateSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(m, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return m.createSnapshot(req.Datastore, req.Id, req.Description)
	})
	return &methods.HostVStorageObjectCreateSnapshot_TaskBody{
		Res: &types.HostVStorageObjectCreateSnapshot_TaskResponse{Returnval: m.faults.runTask("createSnapshot", task)},
	}
}

func (m *hostManager) HostVStorageObjectDeleteSnapshotTask(req *types.HostVStorageObjectDeleteSnapshot_Task) soap.HasFault {
	task := simulator.CreateTask(m, "deleteSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, m.deleteSnapshot(req.Datastore, req.Id, req.SnapshotId)
	})
	return &methods.HostVStorageObjectDeleteSnapshot_TaskBody{
		Res: &types.HostVStorageObjectDeleteSnapshot_TaskResponse{Returnval: task.Run()},
	}
}

func (m *hostManager) HostSetVStorageObjectControlFlags(req *types.HostSetVStorageObjectControlFlags) soap.HasFault {
	body := new(methods.HostSetVStorageObjectControlFlagsBody)
	if f := m.controlFlags(req.Datastore, req.Id, req.ControlFlags, true); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = new(types.HostSetVStorageObjectControlFlagsResponse)
	}
	return body
}

func (m *hostManager) HostClearVStorageObjectControlFlags(req *types.HostClearVStorageObjectControlFlags) soap.HasFault {
	body := new(methods.HostClearVStorageObjectControlFlagsBody)
	if f := m.controlFlags(req.Datastore, req.Id, req.ControlFlags, false); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = new(types.HostClearVStorageObjectControlFlagsResponse)
	}
	return body
}
