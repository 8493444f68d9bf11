// Command vcsim is ivdfs's test-bed launcher for govmomi's vSphere simulator.
//
// By default it serves a VPX (vCenter) model with several datastores over TLS,
// raised to API 6.7 so that pyvmomi allows the VStorageObject snapshot
// methods. The login is taken from VCSIM_USER/VCSIM_PASSWORD (never argv) and
// any other credentials are refused. Once listening it prints one JSON line
// {"url", "port", "thumbprint"} on stdout, then runs until SIGTERM/SIGINT or
// stdin EOF (so it dies with a parent that holds its stdin pipe).
//
// vcsim 0.24's own VStorageObjectManager is replaced by ours (store.go,
// managers.go): the same behaviour for what it had, plus snapshot details,
// changed block tracking (cbt.go), control flags, associations, an ESX mode
// with HostVStorageObjectManager (-esx), the VSLM endpoint (-vslm, vslm.go),
// start-up population (-populate), a delay on the inventory queries only
// (-inventory-delay), and failing snapshot tasks or lost replies to their
// requests on demand (-faults, faults.go).
// Every new behaviour is off unless its flag is given.
//
// The vmware_soap_session cookie is sent quoted, as vCenter and ESXi send it
// (vcsim sends it bare), for clients connecting as 127.0.0.1 or localhost.
package main

import (
	"crypto/sha1"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vslm"
)

// inventoryMethods are the wire names -inventory-delay slows down: the queries
// a client makes per IVD or per datastore, on every endpoint. Logins, tasks
// and the property collector stay fast so that beds build quickly.
var inventoryMethods = []string{
	"ListVStorageObject", "RetrieveVStorageObject", "RetrieveSnapshotInfo",
	"RetrieveSnapshotDetails", "VstorageObjectVCenterQueryChangedDiskAreas",
	"RetrieveVStorageObjectAssociations",
	"HostListVStorageObject", "HostRetrieveVStorageObject", "HostVStorageObjectRetrieveSnapshotInfo",
	"VslmListVStorageObjectForSpec", "VslmRetrieveVStorageObjects", "VslmRetrieveVStorageObject",
	"VslmRetrieveVStorageObjectAssociations", "VslmRetrieveSnapshotInfo",
	"VslmRetrieveSnapshotDetails", "VslmQueryChangedDiskAreas",
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "vcsim: "+format+"\n", args...)
	os.Exit(2)
}

// productVersion turns an API version into About.version ("7.0.2.0" -> "7.0.2").
func productVersion(api version) string {
	v := append(version{}, api...)
	for len(v) < 3 {
		v = append(v, 0)
	}
	return v[:3].String()
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "PEM certificate to serve (default: vcsim's built-in one)")
	keyFile := flag.String("key", "", "PEM private key of -cert")
	datastores := flag.Int("ds", 3, "number of datastores (LocalDS_0, LocalDS_1, ...)")
	noStdin := flag.Bool("no-stdin", false, "do not exit on stdin EOF")
	delay := flag.Int("delay", 0, "milliseconds added to every SOAP method (a slow vCenter)")
	idle := flag.Duration("session-idle", 0, "expire sessions idle this long (0: never)")
	esxMode := flag.Bool("esx", false, "serve a standalone ESXi host (HostAgent, ha-datacenter) instead of a vCenter")
	apiVersion := flag.String("api-version", "6.7", "About.apiVersion to advertise (6.7 or later)")
	vslmOn := flag.Bool("vslm", false, "serve the VSLM endpoint /vslm/sdk (vCenter, -api-version 6.7.2 or later)")
	pageLimit := flag.Int("vslm-page-limit", 1000, "most IDs one VslmListVStorageObjectForSpec call returns")
	invDelay := flag.Duration("inventory-delay", 0, "delay added to each IVD inventory query (whole milliseconds)")
	populateFile := flag.String("populate", "", "JSON spec of IVDs to create at start-up (see populate.go)")
	populatedFile := flag.String("populated", "", "where -populate writes what it created (JSON)")
	images := flag.String("images", "", "stand-in VDDK image directory (DIR/<ivd-id>/<snapshot-id>.raw) for CBT")
	cbtBlock := flag.Int64("cbt-block", 64<<10, "CBT granularity in bytes (power of two, 512 or more)")
	cbtAreas := flag.Int("cbt-max-areas", 2000, "most changed areas one QueryChangedDiskAreas call returns")
	cbtSpan := flag.Int64("cbt-max-span", 16<<20, "most bytes one QueryChangedDiskAreas call covers (multiple of -cbt-block)")
	dsNames := flag.String("ds-names", "", "JSON list of names for the datastores, in order (any text: '/', control characters, \"by-name\")")
	faultDir := flag.String("faults", "", "fail every createSnapshot/deleteSnapshot task while DIR/<operation> exists; lose the reply to the next one's request while DIR/<operation>.lost-reply exists (faults.go)")
	flag.Parse()

	user, pass := os.Getenv("VCSIM_USER"), os.Getenv("VCSIM_PASSWORD")
	if user == "" || pass == "" {
		fail("VCSIM_USER and VCSIM_PASSWORD must be set")
	}
	api, ok := parseVersion(*apiVersion)
	if !ok || api.cmp(mustVersion("6.7")) < 0 {
		fail("-api-version %q: need a dotted version, 6.7 or later", *apiVersion)
	}
	if *vslmOn && *esxMode {
		fail("-vslm: VSLM is a vCenter endpoint; an ESXi host has none")
	}
	if *vslmOn && api.cmp(vslmFirst) < 0 {
		fail("-vslm needs -api-version 6.7.2 (vCenter 6.7 U2) or later, not %s", *apiVersion)
	}
	if *pageLimit < 1 {
		fail("-vslm-page-limit must be at least 1")
	}
	if *invDelay < 0 || *invDelay%time.Millisecond != 0 {
		fail("-inventory-delay %v: whole milliseconds only", *invDelay)
	}
	if (*populateFile == "") != (*populatedFile == "") {
		fail("-populate and -populated go together")
	}
	if b := *cbtBlock; b < 512 || b&(b-1) != 0 {
		fail("-cbt-block %d: a power of two, 512 or more", b)
	}
	if *cbtAreas < 1 || *cbtSpan < *cbtBlock || *cbtSpan%*cbtBlock != 0 {
		fail("-cbt-max-areas must be at least 1 and -cbt-max-span a multiple of -cbt-block")
	}
	if *images != "" {
		if st, err := os.Stat(*images); err != nil || !st.IsDir() {
			fail("-images %s: not a directory", *images)
		}
	}
	if *faultDir != "" {
		if st, err := os.Stat(*faultDir); err != nil || !st.IsDir() {
			fail("-faults %s: not a directory", *faultDir)
		}
	}

	var model *simulator.Model
	if *esxMode {
		model = simulator.ESX()
		about := &model.ServiceContent.About
		about.Version = productVersion(api)
		about.Build = "8169922"
		about.FullName = fmt.Sprintf("VMware ESXi %s build-%s", about.Version, about.Build)
	} else {
		model = simulator.VPX()
		about := &model.ServiceContent.About
		about.Version = productVersion(api)
		about.FullName = fmt.Sprintf("VMware vCenter Server %s build-%s", about.Version, about.Build)
	}
	model.ServiceContent.About.ApiVersion = *apiVersion
	model.Datastore = *datastores
	model.Machine = 0 // VMs are not needed and slow start-up
	model.DelayConfig.Delay = *delay
	simulator.SessionIdleTimeout = *idle
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	if *esxMode {
		// vcsim's ESX template lists a datastore that the model never creates.
		dc := simulator.Map.Get(types.ManagedObjectReference{Type: "Datacenter", Value: "ha-datacenter"}).(*simulator.Datacenter)
		var real []types.ManagedObjectReference
		for _, ref := range dc.Datastore {
			if simulator.Map.Get(ref) != nil {
				real = append(real, ref)
			}
		}
		dc.Datastore = real
	}

	if *dsNames != "" {
		if err := renameDatastores(*dsNames); err != nil {
			fail("-ds-names: %v", err)
		}
	}

	st := newStore()
	o := ops{st: st, cbt: &cbtConfig{images: *images, block: *cbtBlock, maxAreas: *cbtAreas, maxSpan: *cbtSpan},
		faults: faults{dir: *faultDir}}
	content := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance).Content
	ref := *content.VStorageObjectManager
	if *esxMode {
		m := &hostManager{ops: o}
		m.Self = ref
		simulator.Map.Put(m)
	} else {
		m := &vcenterManager{ops: o}
		m.Self = ref
		simulator.Map.Put(m)
	}

	if *populateFile != "" {
		if err := populate(st, *populateFile, *populatedFile); err != nil {
			fail("-populate: %v", err)
		}
	}

	tlsConfig := new(tls.Config)
	if *certFile != "" || *keyFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatal(err)
		}
		tlsConfig.Certificates = []tls.Certificate{cert}
	}
	model.Service.TLS = tlsConfig
	// A non-default Listen.User makes SessionManager.validLogin compare exactly.
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(user, pass)}

	mux := http.NewServeMux()
	model.Service.ServeMux = mux
	slow := newInventoryDelay(*invDelay, *faultDir)
	if *vslmOn {
		mux.Handle(vslm.Path, slow.wrap(registerVSLM(model.Service, o, api, *pageLimit, content.About)))
	}
	// Host-specific patterns win over the plain "/sdk" that NewServer registers.
	quoted := o.faults.lostReply(quoteSessionCookie(slow.wrap(http.HandlerFunc(model.Service.ServeSDK))))
	mux.Handle("127.0.0.1"+vim25.Path, quoted)
	mux.Handle("localhost"+vim25.Path, quoted)

	server := model.Service.NewServer()
	defer server.Close()

	sum := sha1.Sum(server.Certificate().Raw)
	hexPairs := make([]string, len(sum))
	for i, b := range sum {
		hexPairs[i] = fmt.Sprintf("%02X", b)
	}
	addr := server.Listener.Addr().(*net.TCPAddr)
	line, _ := json.Marshal(struct {
		URL        string `json:"url"`
		Port       int    `json:"port"`
		Thumbprint string `json:"thumbprint"`
	}{fmt.Sprintf("https://%s/sdk", addr), addr.Port, strings.Join(hexPairs, ":")})
	os.Stdout.Write(append(line, '\n'))
	os.Stdout.Sync()

	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGTERM, syscall.SIGINT)
	if !*noStdin {
		go func() {
			_, _ = io.Copy(ioutil.Discard, os.Stdin)
			done <- syscall.SIGHUP
		}()
	}
	<-done
}

// quoteSessionCookie rewrites `vmware_soap_session=X;` into
// `vmware_soap_session="X";` in Set-Cookie, the form real servers send.
func quoteSessionCookie(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(&quotingWriter{ResponseWriter: w}, r)
	})
}

type quotingWriter struct {
	http.ResponseWriter
	fixed bool
}

func (q *quotingWriter) fix() {
	if q.fixed {
		return
	}
	q.fixed = true
	prefix := soap.SessionCookieName + "="
	values := q.Header()["Set-Cookie"]
	for i, c := range values {
		if !strings.HasPrefix(c, prefix) || strings.HasPrefix(c, prefix+`"`) {
			continue
		}
		rest := c[len(prefix):]
		end := strings.IndexByte(rest, ';')
		if end < 0 {
			end = len(rest)
		}
		values[i] = prefix + `"` + rest[:end] + `"` + rest[end:]
	}
}

func (q *quotingWriter) WriteHeader(code int) {
	q.fix()
	q.ResponseWriter.WriteHeader(code)
}

func (q *quotingWriter) Write(b []byte) (int, error) {
	q.fix()
	return q.ResponseWriter.Write(b)
}

// renameDatastores gives the model's datastores the names listed in the JSON file, in
// inventory order: vSphere lets administrators name a datastore almost anything, and vcsim
// has no Rename_Task for datastores.
func renameDatastores(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var names []string
	if err := json.Unmarshal(data, &names); err != nil {
		return err
	}
	var refs []types.ManagedObjectReference
	for _, obj := range simulator.Map.All("Datacenter") {
		refs = append(refs, obj.(*simulator.Datacenter).Datastore...)
	}
	if len(names) > len(refs) {
		return fmt.Errorf("%d names for %d datastores", len(names), len(refs))
	}
	for i, name := range names {
		ds := simulator.Map.Get(refs[i]).(*simulator.Datastore)
		ds.Name = name
		ds.Summary.Name = name
	}
	return nil
}
