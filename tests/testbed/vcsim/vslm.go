package main

// The VSLM endpoint of vCenter 6.7 U2 and later: /vslm/sdk serving
// VslmServiceInstance and VslmVStorageObjectManager over the same store as
// the vim VcenterVStorageObjectManager.
//
// Session: VSLM has no login of its own here; a client sends its vim session
// id (the vmware_soap_session cookie's value, unquoted) in a SOAP header
// <vcSessionCookie>, as VMware's own SDKs do for vslm, pbm and sms. The HTTP
// Cookie header is ignored on this endpoint: whether real vCenter accepts it
// for VSLM is not known, so the stricter behaviour is modelled. Every method,
// RetrieveContent included, needs a valid session (real vCenter lets
// RetrieveContent through anonymously; stricter again, and harmless).
//
// Versions: the server speaks VSLM up to the vim API version it advertises
// (6.7.2 for 6.7 U2, 6.7.3, 7.0.x.0, ...). The client's version comes from its
// SOAPAction ("urn:vslm/<version>"); a version the server does not know, or
// newer than it, is refused with a SOAP fault like real VMOMI servers do, and
// replies carry only the fields of the client's version (backingObjectId and
// snapshotInfo from 6.7.3, diskPath and usedCapacityInMB from 7.0.1.0,
// snapshot description/snapshotId/diskPath from 7.0.2.0). Each feature level
// is a registry of its own behind an internal path; the handler routes to it.
//
// VslmListVStorageObjectForSpec returns IDs in ascending order, at most
// min(maxResult, page limit) of them, with allRecordsReturned false when more
// matched; the documented continuation is to repeat the query with an extra
// spec "id greaterThan <last id>". Query fields id, name, backingObjectId,
// datastoreMoId (strings), capacity (MB) and createTime (RFC 3339) take every
// operator of the API (contains/startsWith/endsWith on strings only);
// metadataKey/metadataValue match nothing (no IVD here has metadata). Several
// specs are ANDed; several queryValues mean "any of" (notEquals: "none of").
//
// Concurrency: the simulator serialises calls per manager object; the store
// lock covers the shared state.

import (
	"bytes"
	"fmt"
	"io/ioutil"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
	"github.com/vmware/govmomi/vslm"
	vslmmethods "github.com/vmware/govmomi/vslm/methods"
	vslmtypes "github.com/vmware/govmomi/vslm/types"
)

// version is a dotted numeric version ("6.7.2", "7.0.2.0"); missing parts are 0.
type version []int

func parseVersion(s string) (version, bool) {
	var v version
	for _, p := range strings.Split(s, ".") {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return nil, false
		}
		v = append(v, n)
	}
	return v, len(v) >= 2
}

func (a version) cmp(b version) int {
	for i := 0; i < len(a) || i < len(b); i++ {
		x, y := 0, 0
		if i < len(a) {
			x = a[i]
		}
		if i < len(b) {
			y = b[i]
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}

func (a version) String() string {
	parts := make([]string, len(a))
	for i, n := range a {
		parts[i] = strconv.Itoa(n)
	}
	return strings.Join(parts, ".")
}

func mustVersion(s string) version {
	v, _ := parseVersion(s)
	return v
}

var (
	vslmFirst     = mustVersion("6.7.2")   // VSLM appears (vCenter 6.7 U2)
	vslmBacking   = mustVersion("6.7.3")   // backingObjectId, snapshotInfo
	vslmDiskPath  = mustVersion("7.0.1.0") // diskPath, usedCapacityInMB
	vslmSnapshots = mustVersion("7.0.2.0") // snapshotInfo description, snapshotId, diskPath
	vslmLevels    = []version{vslmFirst, vslmBacking, vslmDiskPath, vslmSnapshots}
	// The VSLM versions pyVmomi 9 knows; a real server knows its own set.
	vslmKnown = []string{"6.7.2", "6.7.3", "7.0.0.0", "7.0.1.0", "7.0.2.0", "9.0.0.0"}
)

type vslmServiceInstance struct {
	types.ManagedObjectReference
	content vslmtypes.VslmServiceInstanceContent
}

func (s *vslmServiceInstance) RetrieveContent(*vslmtypes.RetrieveContent) soap.HasFault {
	return &vslmmethods.RetrieveContentBody{Res: &vslmtypes.RetrieveContentResponse{Returnval: s.content}}
}

type vslmManager struct {
	types.ManagedObjectReference
	ops
	level     version // the feature level this registry answers with
	pageLimit int
}

type vslmSnapshotResult struct {
	BackingObjectId types.ID  `xml:"backingObjectId"`
	Description     string    `xml:"description,omitempty"`
	SnapshotId      *types.ID `xml:"snapshotId,omitempty"`
	DiskPath        string    `xml:"diskPath,omitempty"`
}

// vslmObjectResult is VslmVsoVStorageObjectResult with the 7.0.2 fields that
// govmomi 0.24 lacks.
type vslmObjectResult struct {
	Id               types.ID                    `xml:"id"`
	Name             string                      `xml:"name,omitempty"`
	CapacityInMB     int64                       `xml:"capacityInMB"`
	CreateTime       *time.Time                  `xml:"createTime,omitempty"`
	DatastoreUrl     string                      `xml:"datastoreUrl,omitempty"`
	DiskPath         string                      `xml:"diskPath,omitempty"`
	UsedCapacityInMB *int64                      `xml:"usedCapacityInMB,omitempty"`
	BackingObjectId  *types.ID                   `xml:"backingObjectId,omitempty"`
	SnapshotInfo     []vslmSnapshotResult        `xml:"snapshotInfo,omitempty"`
	Error            *types.LocalizedMethodFault `xml:"error,omitempty"`
}

type vslmQueryResult struct {
	AllRecordsReturned bool               `xml:"allRecordsReturned"`
	Id                 []types.ID         `xml:"id,omitempty"`
	QueryResults       []vslmObjectResult `xml:"queryResults,omitempty"`
}

// The response element is named after the Go type (simulator.response).
type VslmListVStorageObjectForSpecResponse struct {
	Returnval *vslmQueryResult `xml:"returnval,omitempty"`
}

type vslmListBody struct {
	Res    *VslmListVStorageObjectForSpecResponse `xml:"VslmListVStorageObjectForSpecResponse,omitempty"`
	Fault_ *soap.Fault                            `xml:"http://schemas.xmlsoap.org/soap/envelope/ Fault,omitempty"`
}

func (b *vslmListBody) Fault() *soap.Fault { return b.Fault_ }

type VslmRetrieveVStorageObjectsResponse struct {
	Returnval []vslmObjectResult `xml:"returnval,omitempty"`
}

type vslmRetrieveBody struct {
	Res    *VslmRetrieveVStorageObjectsResponse `xml:"VslmRetrieveVStorageObjectsResponse,omitempty"`
	Fault_ *soap.Fault                          `xml:"http://schemas.xmlsoap.org/soap/envelope/ Fault,omitempty"`
}

func (b *vslmRetrieveBody) Fault() *soap.Fault { return b.Fault_ }

func notFound(id string) *types.LocalizedMethodFault {
	return &types.LocalizedMethodFault{
		Fault:            new(types.NotFound),
		LocalizedMessage: fmt.Sprintf("The object or item referred to could not be found: %s", id),
	}
}

func (m *vslmManager) resultLocked(v *ivd) vslmObjectResult {
	created := v.created
	r := vslmObjectResult{
		Id:           types.ID{Id: v.id},
		Name:         v.name,
		CapacityInMB: v.capacityMB,
		CreateTime:   &created,
	}
	if ds, ok := simulator.Map.Get(v.ds).(*simulator.Datastore); ok {
		r.DatastoreUrl = ds.Summary.Url
	}
	if m.level.cmp(vslmDiskPath) >= 0 {
		r.DiskPath = v.backingPath()
		used := int64(0) // thin and never written, as far as vcsim knows
		r.UsedCapacityInMB = &used
	}
	if m.level.cmp(vslmBacking) >= 0 {
		r.BackingObjectId = &types.ID{Id: v.backingID}
		for _, sn := range v.snaps {
			s := vslmSnapshotResult{BackingObjectId: types.ID{Id: sn.backingID}}
			if m.level.cmp(vslmSnapshots) >= 0 {
				s.Description = sn.description
				s.SnapshotId = &types.ID{Id: sn.id}
				s.DiskPath = v.snapshotPath(sn)
			}
			r.SnapshotInfo = append(r.SnapshotInfo, s)
		}
	}
	return r
}

var (
	queryOps = map[string]bool{"equals": true, "notEquals": true, "lessThan": true, "greaterThan": true,
		"lessThanOrEqual": true, "greaterThanOrEqual": true, "contains": true, "startsWith": true, "endsWith": true}
	queryFields = map[string]bool{"id": true, "name": true, "capacity": true, "createTime": true,
		"backingObjectId": true, "datastoreMoId": true, "metadataKey": true, "metadataValue": true}
)

func validateQuery(specs []vslmtypes.VslmVsoVStorageObjectQuerySpec) *soap.Fault {
	for _, q := range specs {
		switch {
		case !queryFields[q.QueryField]:
			return faultMsg("unknown queryField "+q.QueryField, &types.InvalidArgument{InvalidProperty: "queryField"})
		case !queryOps[q.QueryOperator]:
			return faultMsg("unknown queryOperator "+q.QueryOperator, &types.InvalidArgument{InvalidProperty: "queryOperator"})
		case len(q.QueryValue) == 0:
			return faultMsg("queryValue is empty", &types.InvalidArgument{InvalidProperty: "queryValue"})
		}
		numeric := q.QueryField == "capacity" || q.QueryField == "createTime"
		if numeric {
			switch q.QueryOperator {
			case "contains", "startsWith", "endsWith":
				return faultMsg(q.QueryOperator+" does not apply to "+q.QueryField,
					&types.InvalidArgument{InvalidProperty: "queryOperator"})
			}
			for _, val := range q.QueryValue {
				if _, ok := numericValue(q.QueryField, val); !ok {
					return faultMsg(fmt.Sprintf("bad %s value %q", q.QueryField, val),
						&types.InvalidArgument{InvalidProperty: "queryValue"})
				}
			}
		}
	}
	return nil
}

func numericValue(field, s string) (int64, bool) {
	if field == "createTime" {
		t, err := time.Parse(time.RFC3339Nano, s)
		return t.UnixNano(), err == nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

func compare(op string, c int) bool {
	switch op {
	case "equals":
		return c == 0
	case "lessThan":
		return c < 0
	case "greaterThan":
		return c > 0
	case "lessThanOrEqual":
		return c <= 0
	case "greaterThanOrEqual":
		return c >= 0
	}
	return false
}

func holds(op, have, want string, numeric bool, field string) bool {
	if numeric {
		a, _ := numericValue(field, have)
		b, _ := numericValue(field, want)
		c := 0
		if a < b {
			c = -1
		} else if a > b {
			c = 1
		}
		return compare(op, c)
	}
	switch op {
	case "contains":
		return strings.Contains(have, want)
	case "startsWith":
		return strings.HasPrefix(have, want)
	case "endsWith":
		return strings.HasSuffix(have, want)
	}
	return compare(op, strings.Compare(have, want))
}

func matchLocked(v *ivd, q vslmtypes.VslmVsoVStorageObjectQuerySpec) bool {
	var have []string
	switch q.QueryField {
	case "id":
		have = []string{v.id}
	case "name":
		have = []string{v.name}
	case "backingObjectId":
		have = []string{v.backingID}
	case "datastoreMoId":
		have = []string{v.ds.Value}
	case "capacity":
		have = []string{strconv.FormatInt(v.capacityMB, 10)}
	case "createTime":
		have = []string{v.created.Format(time.RFC3339Nano)}
	}
	numeric := q.QueryField == "capacity" || q.QueryField == "createTime"
	for _, h := range have {
		if q.QueryOperator == "notEquals" {
			none := true
			for _, w := range q.QueryValue {
				if holds("equals", h, w, numeric, q.QueryField) {
					none = false
				}
			}
			if none {
				return true
			}
			continue
		}
		for _, w := range q.QueryValue {
			if holds(q.QueryOperator, h, w, numeric, q.QueryField) {
				return true
			}
		}
	}
	return false
}

func (m *vslmManager) VslmListVStorageObjectForSpec(req *vslmtypes.VslmListVStorageObjectForSpec) soap.HasFault {
	body := new(vslmListBody)
	if req.MaxResult < 1 {
		body.Fault_ = faultMsg("maxResult must be at least 1", &types.InvalidArgument{InvalidProperty: "maxResult"})
		return body
	}
	if f := validateQuery(req.Query); f != nil {
		body.Fault_ = f
		return body
	}
	limit := int(req.MaxResult)
	if limit > m.pageLimit {
		limit = m.pageLimit
	}
	m.st.mu.RLock()
	defer m.st.mu.RUnlock()
	res := &vslmQueryResult{AllRecordsReturned: true}
	for _, v := range m.st.sortedLocked() {
		ok := true
		for _, q := range req.Query {
			if !matchLocked(v, q) {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		if len(res.Id) == limit {
			res.AllRecordsReturned = false
			break
		}
		res.Id = append(res.Id, types.ID{Id: v.id})
		res.QueryResults = append(res.QueryResults, m.resultLocked(v))
	}
	body.Res = &VslmListVStorageObjectForSpecResponse{Returnval: res}
	return body
}

func (m *vslmManager) VslmRetrieveVStorageObjects(req *vslmtypes.VslmRetrieveVStorageObjects) soap.HasFault {
	m.st.mu.RLock()
	defer m.st.mu.RUnlock()
	res := &VslmRetrieveVStorageObjectsResponse{}
	for _, id := range req.Ids {
		if v := m.st.byID[id.Id]; v != nil {
			res.Returnval = append(res.Returnval, m.resultLocked(v))
		} else {
			res.Returnval = append(res.Returnval, vslmObjectResult{Id: id, Error: notFound(id.Id)})
		}
	}
	return &vslmRetrieveBody{Res: res}
}

func (m *vslmManager) VslmRetrieveVStorageObjectAssociations(req *vslmtypes.VslmRetrieveVStorageObjectAssociations) soap.HasFault {
	m.st.mu.RLock()
	defer m.st.mu.RUnlock()
	res := &vslmtypes.VslmRetrieveVStorageObjectAssociationsResponse{}
	for _, id := range req.Ids {
		a := vslmtypes.VslmVsoVStorageObjectAssociations{Id: id}
		if v := m.st.byID[id.Id]; v == nil {
			a.Fault = notFound(id.Id)
		} else {
			for _, at := range v.attachments {
				a.VmDiskAssociation = append(a.VmDiskAssociation,
					vslmtypes.VslmVsoVStorageObjectAssociationsVmDiskAssociation{VmId: at.VMID, DiskKey: at.DiskKey})
			}
		}
		res.Returnval = append(res.Returnval, a)
	}
	return &vslmmethods.VslmRetrieveVStorageObjectAssociationsBody{Res: res}
}

func (m *vslmManager) find(id types.ID) (types.ManagedObjectReference, bool) {
	m.st.mu.RLock()
	defer m.st.mu.RUnlock()
	if v := m.st.byID[id.Id]; v != nil {
		return v.ds, true
	}
	return types.ManagedObjectReference{}, false
}

func (m *vslmManager) VslmRetrieveVStorageObject(req *vslmtypes.VslmRetrieveVStorageObject) soap.HasFault {
	body := new(vslmmethods.VslmRetrieveVStorageObjectBody)
	ds, ok := m.find(req.Id)
	if !ok {
		body.Fault_ = fault(new(types.NotFound))
	} else if obj, f := m.retrieve(ds, req.Id); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &vslmtypes.VslmRetrieveVStorageObjectResponse{Returnval: *obj}
	}
	return body
}

func (m *vslmManager) VslmRetrieveSnapshotInfo(req *vslmtypes.VslmRetrieveSnapshotInfo) soap.HasFault {
	body := new(vslmmethods.VslmRetrieveSnapshotInfoBody)
	m.st.mu.RLock()
	defer m.st.mu.RUnlock()
	if v := m.st.byID[req.Id.Id]; v == nil {
		body.Fault_ = fault(new(types.NotFound))
	} else {
		body.Res = &vslmtypes.VslmRetrieveSnapshotInfoResponse{Returnval: v.snapshotInfo()}
	}
	return body
}

func (m *vslmManager) VslmRetrieveSnapshotDetails(req *vslmtypes.VslmRetrieveSnapshotDetails) soap.HasFault {
	body := new(vslmmethods.VslmRetrieveSnapshotDetailsBody)
	ds, ok := m.find(req.Id)
	if !ok {
		body.Fault_ = fault(new(types.NotFound))
	} else if d, f := m.snapshotDetails(ds, req.Id, req.SnapshotId); f != nil {
		body.Fault_ = fault(f)
	} else {
		body.Res = &vslmtypes.VslmRetrieveSnapshotDetailsResponse{Returnval: *d}
	}
	return body
}

func (m *vslmManager) VslmQueryChangedDiskAreas(req *vslmtypes.VslmQueryChangedDiskAreas) soap.HasFault {
	body := new(vslmmethods.VslmQueryChangedDiskAreasBody)
	ds, ok := m.find(req.Id)
	if !ok {
		body.Fault_ = fault(new(types.NotFound))
	} else if info, f := m.changedAreas(ds, req.Id, req.SnapshotId, req.StartOffset, req.ChangeId); f != nil {
		body.Fault_ = f
	} else {
		body.Res = &vslmtypes.VslmQueryChangedDiskAreasResponse{Returnval: *info}
	}
	return body
}

// -- endpoint --------------------------------------------------------------------------

type vslmHandler struct {
	svc    *simulator.Service
	server version
	paths  []string // internal registry path per entry of vslmLevels (up to server)
}

// registerVSLM builds one registry per feature level up to `server` and
// registers them on a scratch mux (they must not be reachable directly: the
// handler returned applies the session and version rules first).
func registerVSLM(svc *simulator.Service, o ops, server version, pageLimit int,
	about types.AboutInfo) *vslmHandler {
	h := &vslmHandler{svc: svc, server: server}
	real := svc.ServeMux
	svc.ServeMux = http.NewServeMux()
	for _, level := range vslmLevels {
		if level.cmp(server) > 0 {
			break
		}
		r := simulator.NewRegistry()
		r.Namespace = vslm.Namespace
		r.Path = vslm.Path + "@" + level.String()
		mgr := &vslmManager{
			ManagedObjectReference: types.ManagedObjectReference{Type: "VslmVStorageObjectManager", Value: "VStorageObjectManager"},
			ops:                    o,
			level:                  level,
			pageLimit:              pageLimit,
		}
		si := &vslmServiceInstance{
			ManagedObjectReference: vslm.ServiceInstance,
			content: vslmtypes.VslmServiceInstanceContent{
				AboutInfo: vslmtypes.VslmAboutInfo{
					Name:         "VMware Virtual Storage Lifecycle Management Service",
					FullName:     "VMware Virtual Storage Lifecycle Management Service " + about.ApiVersion,
					Vendor:       "VMware, Inc.",
					ApiVersion:   about.ApiVersion,
					InstanceUuid: about.InstanceUuid,
				},
				SessionManager:          types.ManagedObjectReference{Type: "VslmSessionManager", Value: "SessionManager"},
				VStorageObjectManager:   mgr.ManagedObjectReference,
				StorageLifecycleManager: types.ManagedObjectReference{Type: "VslmStorageLifecycleManager", Value: "StorageLifecycleManager"},
			},
		}
		r.Put(si)
		r.Put(mgr)
		svc.RegisterSDK(r)
		h.paths = append(h.paths, r.Path)
	}
	svc.ServeMux = real
	return h
}

var sessionToken = regexp.MustCompile(`^[A-Za-z0-9-]+$`)

func (h *vslmHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	body, err := ioutil.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}

	level := len(h.paths) - 1
	if action := strings.Trim(r.Header.Get("SOAPAction"), `"`); action != "" {
		v, ok := h.clientVersion(action)
		if !ok {
			writeFault(w, fmt.Sprintf("Unsupported version URI %q", action), "InvalidRequest")
			return
		}
		for level > 0 && vslmLevels[level].cmp(v) > 0 {
			level--
		}
	}

	var env struct {
		Header struct {
			Cookie string `xml:"vcSessionCookie"`
		} `xml:"Header"`
	}
	_ = xml.Unmarshal(body, &env)
	r.Header.Del("Cookie")
	if sessionToken.MatchString(env.Header.Cookie) {
		r.Header.Set("Cookie", soap.SessionCookieName+"="+env.Header.Cookie)
	}

	r.URL.Path = h.paths[level]
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	h.svc.ServeSDK(w, r)
}

func (h *vslmHandler) clientVersion(action string) (version, bool) {
	s := strings.TrimPrefix(action, "urn:vslm/")
	if s == action {
		return nil, false
	}
	for _, k := range vslmKnown {
		if s == k {
			v := mustVersion(s)
			return v, v.cmp(h.server) <= 0
		}
	}
	return nil, false
}

func writeFault(w http.ResponseWriter, msg, kind string) {
	var esc bytes.Buffer
	_ = xml.EscapeText(&esc, []byte(msg))
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, `%s<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/"`+
		` xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"`+
		` xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">`+
		`<soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
		`<detail><%sFault xmlns="urn:vim25" xsi:type="%s"></%sFault></detail></soapenv:Fault></soapenv:Body>`+
		`</soapenv:Envelope>`, xml.Header, esc.String(), kind, kind, kind)
}
