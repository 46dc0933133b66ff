// A minimal authoritative DNS responder for the kubelet harness's tests (no dependencies,
// standard library only): it answers A queries over UDP for the names given as
// NAME=IPv4 arguments (case-insensitive, with or without the final dot), NXDOMAIN for any
// other name, and logs each query. It stands for the cluster DNS behind the kube-dns
// Service in tests/tests/kubelet.rs; scripts/images/build.sh builds it (CGO_ENABLED=0) into
// the busybox image as /bin/ferrea-test-dns.
//
//	ferrea-test-dns [-listen :53] web.default.svc.cluster.local=10.96.0.20 ...
package main

import (
	"encoding/binary"
	"flag"
	"log"
	"net"
	"strings"
)

func main() {
	listen := flag.String("listen", ":53", "UDP address to listen on")
	flag.Parse()
	records := map[string]net.IP{}
	for _, a := range flag.Args() {
		name, ip, ok := strings.Cut(a, "=")
		parsed := net.ParseIP(ip).To4()
		if !ok || parsed == nil {
			log.Fatalf("bad record %q (want NAME=IPv4)", a)
		}
		records[strings.ToLower(strings.TrimSuffix(name, "."))] = parsed
	}
	conn, err := net.ListenPacket("udp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("serving %d names on %s", len(records), *listen)
	buf := make([]byte, 1500)
	for {
		n, peer, err := conn.ReadFrom(buf)
		if err != nil {
			log.Print(err)
			continue
		}
		if reply := answer(buf[:n], records); reply != nil {
			if _, err := conn.WriteTo(reply, peer); err != nil {
				log.Print(err)
			}
		}
	}
}

// answer builds the reply to one query, or nil for a packet that is not one.
func answer(q []byte, records map[string]net.IP) []byte {
	if len(q) < 12 || binary.BigEndian.Uint16(q[4:6]) != 1 {
		return nil
	}
	// The question: labels, then type and class.
	i := 12
	var labels []string
	for {
		if i >= len(q) {
			return nil
		}
		l := int(q[i])
		i++
		if l == 0 {
			break
		}
		if l > 63 || i+l > len(q) {
			return nil
		}
		labels = append(labels, string(q[i:i+l]))
		i += l
	}
	if i+4 > len(q) {
		return nil
	}
	qtype := binary.BigEndian.Uint16(q[i : i+2])
	question := q[12 : i+4]
	name := strings.ToLower(strings.Join(labels, "."))
	ip, found := records[name]
	log.Printf("query %s type %d: found=%v", name, qtype, found)

	r := make([]byte, 12, 12+len(question)+16)
	copy(r, q[:2])                                                   // ID
	flags := uint16(0x8400) | binary.BigEndian.Uint16(q[2:4])&0x0100 // QR, AA, RD copied
	if !found {
		flags |= 3 // NXDOMAIN
	}
	binary.BigEndian.PutUint16(r[2:4], flags)
	binary.BigEndian.PutUint16(r[4:6], 1) // QDCOUNT
	r = append(r, question...)
	if found && qtype == 1 {
		binary.BigEndian.PutUint16(r[6:8], 1) // ANCOUNT
		r = append(r, 0xc0, 12)               // the name: a pointer to the question's
		r = binary.BigEndian.AppendUint16(r, 1)
		r = binary.BigEndian.AppendUint16(r, 1)
		r = binary.BigEndian.AppendUint32(r, 5) // TTL
		r = binary.BigEndian.AppendUint16(r, 4)
		r = append(r, ip...)
	}
	return r
}
