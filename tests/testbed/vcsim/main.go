// Command vcsim is ivdfs's test-bed launcher for govmomi's vCenter simulator.
//
// It serves a VPX (vCenter) model with several datastores over TLS, raised to
// API 6.7 so that pyvmomi allows the VStorageObject snapshot methods. The login
// is taken from VCSIM_USER/VCSIM_PASSWORD (never argv) and any other
// credentials are refused. Once listening it prints one JSON line
// {"url", "port", "thumbprint"} on stdout, then runs until SIGTERM/SIGINT or
// stdin EOF (so it dies with a parent that holds its stdin pipe).
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
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "PEM certificate to serve (default: vcsim's built-in one)")
	keyFile := flag.String("key", "", "PEM private key of -cert")
	datastores := flag.Int("ds", 3, "number of datastores (LocalDS_0, LocalDS_1, ...)")
	noStdin := flag.Bool("no-stdin", false, "do not exit on stdin EOF")
	delay := flag.Int("delay", 0, "milliseconds added to every SOAP method (a slow vCenter)")
	idle := flag.Duration("session-idle", 0, "expire sessions idle this long (0: never)")
	flag.Parse()

	user, pass := os.Getenv("VCSIM_USER"), os.Getenv("VCSIM_PASSWORD")
	if user == "" || pass == "" {
		log.Fatal("VCSIM_USER and VCSIM_PASSWORD must be set")
	}

	model := simulator.VPX()
	model.Datastore = *datastores
	model.Machine = 0 // VMs are not needed and slow start-up
	model.ServiceContent.About.Version = "6.7.0"
	model.ServiceContent.About.ApiVersion = "6.7"
	model.ServiceContent.About.FullName = "VMware vCenter Server 6.7.0 build-5973321"
	model.DelayConfig.Delay = *delay
	simulator.SessionIdleTimeout = *idle
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

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
