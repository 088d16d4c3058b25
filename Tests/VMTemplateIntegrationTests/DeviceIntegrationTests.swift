import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// NICs and disks in clones, on real guests: taps in network namespaces the test makes, user-mode
/// networking, raw and qcow2 images with overlays, and hot-plug on running clones.
extension RealGuests {
    @Suite("devices on real guests", .serialized)
    struct DeviceIntegrationTests {
        struct Clone: Decodable {
            var id: String
            var name: String
            var control_socket: String
            var qmp_socket: String
            var devices: [AttachedDevice]
        }

        func clone(_ store: TemporaryStore, _ extra: [String]) throws -> Clone {
            let result = try CLI.run(["clone", SharedTemplate.name, "--json"] + extra + store.arguments)
            try #require(result.status == 0, "clone \(extra) failed: \(result.stderr)")
            return try JSONDecoder().decode(Clone.self, from: Data(result.stdout.utf8))
        }

        func removeAll(_ store: TemporaryStore) {
            let result = try? CLI.run(["rm", "--all"] + store.arguments)
            #expect(result?.status == 0, "rm --all: \(result?.stderr ?? "")")
        }

        /// Asks the guest until `reply` holds (a hot-plugged device takes the guest a moment).
        func guestEventually(_ channel: ControlChannel, _ request: String, _ reply: @escaping (String) -> Bool) async -> String {
            var last = ""
            _ = await eventually(timeout: .seconds(30)) {
                last = (try? channel.request(request, timeout: .seconds(30))) ?? ""
                return reply(last)
            }
            return last
        }

        /// The guest's names for two of the clone's disks, found by the serials vmtemplate gave them.
        func diskNames(_ channel: ControlChannel, _ clone: Clone, _ ids: [String]) async throws -> (String, String) {
            let serials = ids.map { "\(clone.id)-\($0)" }
            let reply = await guestEventually(channel, "serials") { reply in serials.allSatisfy { reply.contains("=\($0)") } }
            let names = serials.map { serial in reply.split(separator: " ").first { $0.hasSuffix("=\(serial)") }.map { String($0.prefix { $0 != "=" }) } ?? "none" }
            #expect(!names.contains("none"), "serials in the guest: \(reply)")
            return (names[0], names[1])
        }

        @Test("two clones on taps in a network namespace get distinct MACs and reach each other, the bridge, and the namespace reaches them", .enabled(if: Environment.isRoot, "needs root for network namespaces and taps"))
        func tapNetworking() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { removeAll(store) }
            let namespace = try NetworkNamespace(bridgeAddress: "10.77.0.1/24", taps: ["vmt-tap0", "vmt-tap1"])
            defer { namespace.remove() }
            let a = try clone(store, ["--nic", "tap=vmt-tap0,netns=\(namespace.path)"])
            let b = try clone(store, ["--nic", "tap=vmt-tap1,netns=\(namespace.path)"])
            let macA = try #require(a.devices.first?.mac)
            let macB = try #require(b.devices.first?.mac)
            #expect(macA != macB)
            #expect(macA.bytes[0] == 0x02, "locally administered, unicast")
            #expect(macA == MACAddress.derived(seed: a.id, index: 0))
            let channelA = ControlChannel(path: a.control_socket)
            let channelB = ControlChannel(path: b.control_socket)
            #expect(try channelA.request("ifaces", timeout: .seconds(60)).contains("eth0=\(macA)"))
            #expect(try channelB.request("ifaces", timeout: .seconds(60)).contains("eth0=\(macB)"))
            #expect(try channelA.request("ip eth0 10.77.0.2/24") == "ok")
            #expect(try channelB.request("ip eth0 10.77.0.3/24") == "ok")
            #expect(try channelA.request("ping 10.77.0.3") == "ok", "clone to clone")
            #expect(try channelB.request("ping 10.77.0.2") == "ok", "clone to clone")
            #expect(try channelA.request("ping 10.77.0.1") == "ok", "clone to bridge")
            #expect(try namespace.ping("10.77.0.2"), "namespace to clone")
            #expect(try namespace.ping("10.77.0.3"), "namespace to clone")
            #expect(a.devices.first?.tapCreated == false, "the test made the tap")
        }

        @Test("a tap that does not exist is made in the namespace for the clone and disappears with it", .enabled(if: Environment.isRoot, "needs root for network namespaces and taps"))
        func createdTap() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { removeAll(store) }
            let namespace = try NetworkNamespace(bridgeAddress: "10.78.0.1/24", taps: [])
            defer { namespace.remove() }
            let made = try clone(store, ["--nic", "tap=vmt-new0,netns=\(namespace.path)"])
            #expect(made.devices.first?.tapCreated == true)
            #expect(namespace.hasLink("vmt-new0"))
            #expect(!NetworkNamespace.hostHasLink("vmt-new0"), "made in the namespace, not on the host")
            let removed = try CLI.run(["rm", made.id] + store.arguments)
            #expect(removed.status == 0)
            #expect(await eventually(timeout: .seconds(10)) { !namespace.hasLink("vmt-new0") }, "the tap went with the clone's QEMU")
        }

        @Test("user-mode networking: a clone with hostfwd is reachable on the forwarded port")
        func userNetworking() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { removeAll(store) }
            let port = try freeLocalPort()
            let made = try clone(store, ["--name", "fwd-1", "--nic", "user,hostfwd=tcp:127.0.0.1:\(port)-:8080"])
            let channel = ControlChannel(path: made.control_socket)
            #expect(try channel.request("ip eth0 10.0.2.15/24", timeout: .seconds(60)) == "ok")
            #expect(try channel.request("serve 8080") == "serving 8080")
            var answer = ""
            _ = await eventually(timeout: .seconds(20)) {
                answer = (try? readFromLocalPort(port)) ?? ""
                return !answer.isEmpty
            }
            #expect(answer.trimmingCharacters(in: .whitespacesAndNewlines) == "fwd-1", "the guest answered on the forwarded port with its hostname")
        }

        @Test("raw and qcow2 images with overlays: the clone reads and writes them, the bases never change, a second clone sees the original bytes, rm removes the overlays")
        func overlayDisks() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { removeAll(store) }
            let images = try TestImages()
            defer { images.remove() }
            let before = try [images.raw, images.qcow2].map(sha256)
            let disks = ["--disk", "path=\(images.raw),overlay=on", "--disk", "path=\(images.qcow2),format=qcow2,overlay=on"]
            let first = try clone(store, disks)
            #expect(first.devices.map(\.id) == ["disk0", "disk1"])
            #expect(first.devices.allSatisfy { $0.serial == "\(first.id)-\($0.id)" })
            let channel = ControlChannel(path: first.control_socket)
            // The guest names disks in the order it finds them: a runtime finds its disk by serial.
            let (raw, qcow2) = try await diskNames(channel, first, ["disk0", "disk1"])
            #expect(try channel.request("disks").split(separator: " ").sorted() == ["\(raw)=1048576", "\(qcow2)=2097152"].sorted())
            #expect(try channel.request("read \(raw) 0 8") == hex("raw-base"))
            #expect(try channel.request("read \(qcow2) 0 8") == hex("qcow-bas"))
            #expect(try channel.request("write \(raw) 0 \(hex("CLONE-1!"))") == "wrote 8")
            #expect(try channel.request("write \(qcow2) 0 \(hex("CLONE-1!"))") == "wrote 8")
            #expect(try channel.request("read \(raw) 0 8") == hex("CLONE-1!"))
            #expect(try channel.request("read \(qcow2) 0 8") == hex("CLONE-1!"))
            let overlays = first.devices.map { "\(store.cloneDirectory(first.id))/\($0.overlayFileName)" }
            #expect(try overlays.map { try FileStatus.read(path: $0).mode } == [0o600, 0o600], "overlays are the store owner's alone")
            #expect(try [images.raw, images.qcow2].map(sha256) == before, "the bases never change")

            let second = try clone(store, disks)
            let secondChannel = ControlChannel(path: second.control_socket)
            let (raw2, qcow22) = try await diskNames(secondChannel, second, ["disk0", "disk1"])
            #expect(try secondChannel.request("read \(raw2) 0 8") == hex("raw-base"), "another clone sees the base, not the first clone's writes")
            #expect(try secondChannel.request("read \(qcow22) 0 8") == hex("qcow-bas"))

            #expect(try CLI.run(["rm", first.id] + store.arguments).status == 0)
            #expect(overlays.allSatisfy { !FileManager.default.fileExists(atPath: $0) }, "rm removed the overlays")
            #expect(try [images.raw, images.qcow2].map(sha256) == before)
        }

        @Test("a block device (a loop device) is a disk: read-only, read-write, and as an overlay's base", .enabled(if: Environment.isRoot, "needs root for loop devices"))
        func blockDeviceDisks() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { removeAll(store) }
            let images = try TestImages()
            defer { images.remove() }
            let loop = try Shell.run("losetup --find --show \(images.raw)").trimmingCharacters(in: .whitespacesAndNewlines)
            defer { _ = try? Shell.run("losetup -d \(loop)") }
            #expect(loop.hasPrefix("/dev/loop"))

            let readOnly = try clone(store, ["--disk", "path=\(loop),readonly=on", "--disk", "path=\(images.qcow2),format=qcow2,overlay=on"])
            let channel = ControlChannel(path: readOnly.control_socket)
            let (disk, _) = try await diskNames(channel, readOnly, ["disk0", "disk1"])
            #expect(try channel.request("read \(disk) 0 8") == hex("raw-base"))
            #expect(try channel.request("write \(disk) 0 \(hex("CLONE-1!"))").hasPrefix("error"), "the guest cannot write a read-only disk")
            #expect(try CLI.run(["rm", readOnly.id] + store.arguments).status == 0)

            let overlay = try clone(store, ["--disk", "path=\(loop),overlay=on", "--disk", "path=\(images.qcow2),format=qcow2,overlay=on"])
            let overlayChannel = ControlChannel(path: overlay.control_socket)
            let (overlaid, _) = try await diskNames(overlayChannel, overlay, ["disk0", "disk1"])
            #expect(try overlayChannel.request("write \(overlaid) 0 \(hex("OVERLAY!"))") == "wrote 8")
            #expect(try overlayChannel.request("read \(overlaid) 0 8") == hex("OVERLAY!"))
            #expect(try CLI.run(["rm", overlay.id] + store.arguments).status == 0)
            #expect(try Data(contentsOf: URL(fileURLWithPath: images.raw)).prefix(8) == Data("raw-base".utf8), "an overlay's base never changes")

            let writable = try clone(store, ["--disk", "path=\(loop)", "--disk", "path=\(images.qcow2),format=qcow2,overlay=on"])
            let writableChannel = ControlChannel(path: writable.control_socket)
            let (written, _) = try await diskNames(writableChannel, writable, ["disk0", "disk1"])
            #expect(try writableChannel.request("write \(written) 0 \(hex("CLONE-RW"))") == "wrote 8")
            #expect(try CLI.run(["rm", writable.id] + store.arguments).status == 0)
            _ = try Shell.run("blockdev --flushbufs \(loop)")
            #expect(try Data(contentsOf: URL(fileURLWithPath: images.raw)).prefix(8) == Data("CLONE-RW".utf8), "a read-write block device is written through")
        }

        @Test("device add and device rm on a running clone; the guest sees the devices come and go")
        func addAndRemove() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { removeAll(store) }
            let images = try TestImages()
            defer { images.remove() }
            let made = try clone(store, [])
            let channel = ControlChannel(path: made.control_socket)
            #expect(try channel.request("disks", timeout: .seconds(60)) == "")
            let added = try CLI.run(["device", "add", made.id, "--nic", "user", "--disk", "path=\(images.raw)", "--json"] + store.arguments)
            try #require(added.status == 0, "\(added.stderr)")
            let devices = try JSONDecoder().decode([AttachedDevice].self, from: Data(added.stdout.utf8))
            #expect(devices.map(\.id) == ["nic0", "disk0"])
            #expect(devices.map(\.bus) == ["hotplug0", "hotplug1"])
            let record = try #require(try TemplateStore(root: store.root).cloneRecord(made.id))
            #expect(record.hotplugSlots == 4, "the busybox recipe gives its machine four root ports")
            #expect(record.qemuArguments.filter { $0.hasPrefix("pcie-root-port,") }.count == 4)
            #expect(await guestEventually(channel, "disks") { $0 == "vda=1048576" } == "vda=1048576")
            #expect(try channel.request("ifaces").contains("eth0=\(MACAddress.derived(seed: made.id, index: 0))"))
            #expect(try channel.request("write vda 0 \(hex("written!"))") == "wrote 8")
            #expect(try Data(contentsOf: URL(fileURLWithPath: images.raw)).prefix(8) == Data("written!".utf8), "without overlay=on the clone writes the image itself")
            let listed = try CLI.run(["device", "list", made.id] + store.arguments)
            #expect(listed.stdout.contains("nic0") && listed.stdout.contains("disk0"))

            let removed = try CLI.run(["device", "rm", made.id, "disk0"] + store.arguments)
            #expect(removed.status == 0, "\(removed.stderr)")
            #expect(try channel.request("disks") == "", "the guest let go of the disk before rm returned")
            #expect(try TemplateStore(root: store.root).cloneRecord(made.id)?.devices?.map(\.id) == ["nic0"])
            // The slot and the name are free again; the image is no longer locked by this clone.
            let again = try CLI.run(["device", "add", made.id, "--disk", "path=\(images.raw),readonly=on", "--json"] + store.arguments)
            #expect(again.status == 0, "\(again.stderr)")
            #expect(again.stdout.contains("\"id\":\"disk0\"") && again.stdout.contains("\"bus\":\"hotplug1\""))

            // A runtime that plugs a device of its own over the clone's QMP socket: device add
            // takes the next free port, not the one QEMU says is occupied.
            let qmp = try await QMPClient.connect(socketPath: made.qmp_socket, timeout: .seconds(10))
            _ = try await qmp.execute("device_add", arguments: ["driver": "virtio-rng-pci", "id": "runtime-rng", "bus": "hotplug2"], as: JSONValue.self)
            qmp.close()
            let next = try CLI.run(["device", "add", made.id, "--nic", "user", "--json"] + store.arguments)
            #expect(next.status == 0 && next.stdout.contains("\"bus\":\"hotplug3\""), "\(next.stdout) \(next.stderr)")
            let full = try CLI.run(["device", "add", made.id, "--nic", "user"] + store.arguments)
            #expect(full.status == 69 && full.stderr.contains("4 in use"), "\(full.stderr)")
        }

        @Test("device errors: no free slot, a busy tap, a missing namespace, a disk another clone writes, an unknown device; nothing is left half-attached", .enabled(if: Environment.isRoot, "needs root for network namespaces and taps"))
        func deviceErrors() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { removeAll(store) }
            let images = try TestImages()
            defer { images.remove() }
            let namespace = try NetworkNamespace(bridgeAddress: "10.79.0.1/24", taps: ["vmt-busy"])
            defer { namespace.remove() }
            let writer = try clone(store, ["--disk", "path=\(images.raw)", "--nic", "tap=vmt-busy,netns=\(namespace.path)"])
            let other = try clone(store, [])
            func refused(_ arguments: [String], saying expected: String) throws {
                let result = try CLI.run(arguments + store.arguments)
                #expect(result.status != 0, "\(arguments) should fail")
                #expect(result.stderr.contains(expected), "\(arguments): \(result.stderr)")
                #expect(result.stderr.split(separator: "\n").first?.hasPrefix("vmtemplate: error: ") == true)
            }
            try refused(["device", "add", other.id, "--nic", "tap=vmt-busy,netns=\(namespace.path)"], saying: "is busy")
            try refused(["device", "add", other.id, "--nic", "tap=vmt-x,netns=/run/netns/vmt-missing-\(getpid())"], saying: "does not exist")
            // Not 66 (no such template or clone): the host's state, 76 (the API's 409).
            #expect(try CLI.run(["clone", SharedTemplate.name, "--nic", "tap=vmt-x,netns=/run/netns/vmt-missing-\(getpid())"] + store.arguments).status == 76)
            try refused(["device", "add", other.id, "--disk", "path=\(images.raw)"], saying: "open in another process")
            try refused(["device", "add", other.id, "--disk", "path=\(images.raw),overlay=on"], saying: "being written by another process")
            try refused(["device", "add", other.id] + Array(repeating: ["--nic", "user"], count: 5).flatMap { $0 }, saying: "no free hot-plug slot")
            try refused(["device", "add", other.id, "--disk", "path=\(images.directory)/missing.raw"], saying: "does not exist")
            try refused(["device", "add", other.id, "--disk", "path=\(images.qcow2)"], saying: "pass format=qcow2")
            try refused(["device", "add", other.id, "--disk", "path=\(images.backed),format=qcow2,overlay=on"], saying: "backing file of its own")
            try refused(["device", "rm", other.id, "disk7"], saying: "has no device 'disk7'")
            symlink(images.raw, "\(images.directory)/link.raw")
            try refused(["device", "add", other.id, "--disk", "path=\(images.directory)/link.raw,readonly=on"], saying: "symbolic link")
            mkfifo("\(images.directory)/fifo", 0o600)
            try refused(["device", "add", other.id, "--disk", "path=\(images.directory)/fifo,readonly=on"], saying: "not a regular file")
            try refused(["device", "add", other.id, "--nic", "tap=vmt-y,netns=\(images.raw)"], saying: "not a namespace file")
            try refused(["clone", SharedTemplate.name, "--disk", "path=\(images.raw)"], saying: "open in another process")
            try refused(["clone", SharedTemplate.name, "--nic", "tap=vmt-busy,netns=\(namespace.path)"], saying: "is busy")
            // Nothing half-attached: no record of a device, no block node or netdev left in QEMU.
            #expect(try TemplateStore(root: store.root).cloneRecord(other.id)?.devices ?? [] == [])
            let qmp = try await QMPClient.connect(socketPath: other.qmp_socket, timeout: .seconds(10))
            defer { qmp.close() }
            let nodes = try await qmp.execute("query-named-block-nodes", as: JSONValue.self)
            #expect(nodes.arrayValue?.isEmpty == true, "block nodes left behind: \(nodes)")
            let network = try await qmp.execute("human-monitor-command", arguments: ["command-line": "info network"], as: String.self)
            #expect(!network.contains("netdev-"), "netdevs left behind: \(network)")
            // Failed clones leave no QEMU and no directory.
            #expect(try TemplateStore(root: store.root).clones().records.map(\.id).sorted() == [writer.id, other.id].sorted())
        }

        @Test("--nic and --disk specs that are wrong are refused before anything starts")
        func badSpecs() async throws {
            let store = try await SharedTemplate.shared.store()
            for (spec, expected) in [
                (["--nic", "tap="], "not an interface name"),
                (["--nic", "tap"], "incomplete option"),
                (["--nic", "tap=waytoolongname0123"], "not an interface name"),
                (["--nic", "user,netns=/run/netns/x"], "netns= goes with tap="),
                (["--nic", "user,hostfwd=tcp:1.2.3.4"], "not a forwarding rule"),
                (["--nic", "tap=t0,mac=01:00:00:00:00:01"], "multicast"),
                (["--nic", "tap=t0,mac=zz"], "not a MAC address"),
                (["--disk", "format=raw"], "path=FILE (or fd=N) is missing"),
                (["--disk", "path=relative.img"], "absolute path"),
                (["--disk", "path=/a,readonly=on,overlay=on"], "pick one"),
                (["--disk", "path=/a,,b"], "comma"),
                (["--disk", "path=/a,format=vmdk"], "not raw or qcow2"),
            ] {
                let result = try CLI.run(["clone", SharedTemplate.name] + spec + store.arguments)
                #expect(result.status != 0, "\(spec)")
                #expect(result.stderr.contains(expected), "\(spec): \(result.stderr)")
            }
            #expect(try TemplateStore(root: store.root).clones().records.isEmpty)
        }
    }
}

/// A network namespace with a bridge (with an address) and taps on it, made by a test.
struct NetworkNamespace {
    let name: String
    var path: String { "/run/netns/\(name)" }

    init(bridgeAddress: String, taps: [String]) throws {
        name = "vmt-\(getpid())-\(UUID().uuidString.prefix(6))"
        var script = """
            ip netns add \(name)
            ip -n \(name) link set lo up
            ip -n \(name) link add vmt-br0 type bridge
            ip -n \(name) addr add \(bridgeAddress) dev vmt-br0
            ip -n \(name) link set vmt-br0 up

            """
        for tap in taps {
            script += "ip -n \(name) tuntap add \(tap) mode tap && ip -n \(name) link set \(tap) master vmt-br0 && ip -n \(name) link set \(tap) up\n"
        }
        try Shell.run("set -e\n" + script)
    }

    func ping(_ address: String) throws -> Bool {
        (try? Shell.run("ip netns exec \(name) /bin/busybox ping -c 1 -W 5 \(address)")) != nil
    }

    func hasLink(_ link: String) -> Bool {
        (try? Shell.run("ip -n \(name) link show \(link)")) != nil
    }

    static func hostHasLink(_ link: String) -> Bool {
        (try? Shell.run("ip link show \(link)")) != nil
    }

    func remove() {
        _ = try? Shell.run("ip netns delete \(name)")
    }
}

/// Disk images with known bytes: raw (1 MiB, "raw-base" first), qcow2 (2 MiB, "qcow-bas" first),
/// and a qcow2 with a backing file of its own (refused).
struct TestImages {
    let directory: String
    var raw: String { "\(directory)/base.raw" }
    var qcow2: String { "\(directory)/base.qcow2" }
    var backed: String { "\(directory)/backed.qcow2" }

    init() throws {
        directory = "/tmp/vmt-img-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try (Data("raw-base".utf8) + Data(count: (1 << 20) - 8)).write(to: URL(fileURLWithPath: raw))
        let source = "\(directory)/q.raw"
        try (Data("qcow-base".utf8) + Data(count: (2 << 20) - 9)).write(to: URL(fileURLWithPath: source))
        try Shell.run("""
            set -e
            qemu-img convert -f raw -O qcow2 \(source) \(qcow2)
            rm \(source)
            qemu-img create -q -f qcow2 -b \(qcow2) -F qcow2 \(backed)
            """)
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }
}

enum Shell {
    @discardableResult
    static func run(_ script: String) throws -> String {
        let result = try ShortCommand.run("/bin/sh", ["-c", script])
        guard result.status == 0 else {
            throw VMTemplateError(.internalError, "shell failed (\(result.status)): \(script)", detail: result.stderr)
        }
        return result.stdout
    }
}

func sha256(_ path: String) throws -> String {
    try Shell.run("sha256sum \(path)").prefix(64).description
}

func hex(_ text: String) -> String {
    text.utf8.map { String(format: "%02x", $0) }.joined()
}

/// A TCP port on 127.0.0.1 nobody listens on right now.
func freeLocalPort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
    guard bound == 0 else { throw VMTemplateError(.ioError, "bind: \(errnoText())") }
    _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    return UInt16(bigEndian: address.sin_port)
}

/// Connects to 127.0.0.1:`port` and reads until the peer closes (at most 5 s).
func readFromLocalPort(_ port: UInt16) throws -> String {
    let result = try ShortCommand.run("/bin/busybox", ["nc", "-w", "5", "127.0.0.1", String(port)])
    guard result.status == 0 else { throw VMTemplateError(.ioError, "nc failed", detail: result.stderr) }
    return result.stdout
}
