import Foundation
import Testing

@testable import VMTemplateAPI
@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// Taps and disk images handed over as descriptors (`fd=`): a member of the socket's group
/// deposits what it opened itself on `serve`'s descriptor socket and names the token in the API;
/// the CLI's caller passes inherited descriptors. Real guests, a real tap in a namespace.
extension RealGuests {
    @Suite("descriptors handed over", .serialized)
    struct DescriptorIntegrationTests {
        /// Opens the tap named by argv[2] (it must be the caller's: `ip tuntap add ... user`) and
        /// each image in argv[3...] (path:r or path:rw), deposits each on the socket argv[1], and
        /// prints the answers as a JSON list. Extra deposits probe what the server refuses.
        static let depositor = #"""
            import fcntl, json, os, socket, struct, sys
            def deposit(fd, message=b'{}', fds=None):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(sys.argv[1])
                socket.send_fds(s, [message], [fd] if fds is None else fds)
                answer = json.loads(s.recv(4096))
                s.close()
                return answer
            answers = []
            if sys.argv[2] != '-':
                tap = os.open('/dev/net/tun', os.O_RDWR)
                # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
                fcntl.ioctl(tap, 0x400454ca, struct.pack('16sH', sys.argv[2].encode(), 0x0002 | 0x1000 | 0x4000))
                answers.append(deposit(tap))
            for spec in sys.argv[3:]:
                path, mode = spec.rsplit(':', 1)
                answers.append(deposit(os.open(path, os.O_RDWR if mode == 'rw' else os.O_RDONLY)))
            if os.environ.get('PROBE'):
                answers.append(deposit(os.open('/dev/null', os.O_RDONLY)))
                answers.append(deposit(os.open(sys.argv[3].rsplit(':', 1)[0], os.O_PATH)))
                r, w = os.pipe()
                answers.append(deposit(r))
                answers.append(deposit(-1, fds=[]))
                answers.append(deposit(os.open('/dev/null', os.O_RDONLY), message=b'{"kind": "tap", "x": 1}'))
                answers.append(deposit(os.open(sys.argv[3].rsplit(':', 1)[0], os.O_RDONLY), message=b'{"kind": "tap"}'))
                answers.append(deposit(os.open('/proc/self/status', os.O_RDONLY)))
                answers.append(deposit(os.open(sys.argv[3].rsplit(':', 1)[0], os.O_RDONLY), fds=[os.open('/dev/null', os.O_RDONLY) for _ in range(40)]))
            print(json.dumps(answers))
            """#

        @Test("a member of the socket's group attaches a tap and a disk it opened itself, by descriptor tokens; tokens serve their uid once, are given back when a request fails, and what is not a tap or an image is refused", .enabled(if: Environment.isRoot, "needs root for groups, taps and another user"))
        func depositedDescriptors() async throws {
            let store = try await SharedTemplate.shared.store()
            let group = "vmt-f\(UUID().uuidString.prefix(6).lowercased())"
            _ = try Shell.run("groupadd \(group)")
            defer { _ = try? Shell.run("groupdel \(group)") }
            let namespace = try NetworkNamespace(bridgeAddress: "10.79.0.1/24", taps: [])
            defer { namespace.remove() }
            // A tap of nobody's, as a runtime gets one made for its sandbox: nobody may attach it.
            try Shell.run("ip -n \(namespace.name) tuntap add vmt-fd0 mode tap user nobody && ip -n \(namespace.name) link set vmt-fd0 master vmt-br0 && ip -n \(namespace.name) link set vmt-fd0 up")
            let images = try TestImages()
            defer { images.remove() }
            try Shell.run("chown nobody \(images.raw) \(images.qcow2) && chmod 0600 \(images.raw) \(images.qcow2)")
            let before = try sha256(images.raw)
            let server = try CLI.start(["serve", "--socket-group", group] + store.arguments)
            defer {
                server.process.terminate()
                server.process.waitUntilExit()
                _ = try? CLI.run(["rm", "--all"] + store.arguments)
            }
            let socket = "\(store.root)/serve.sock"
            let descriptorSocket = "\(store.root)/serve-fds.sock"
            let client = UnixHTTPClient(socketPath: socket)
            #expect(await eventually(timeout: .seconds(30)) { (try? client.request("GET", "/v1/version"))?.status == 200 })
            let version = try JSONSerialization.jsonObject(with: client.request("GET", "/v1/version").body) as? [String: String]
            #expect(version?["descriptor_socket"] == descriptorSocket)
            #expect(try FileStatus.read(path: descriptorSocket).mode == 0o660, "the API socket's mode and group")

            let identity = ["--reuid=nobody", "--regid=\(group)", "--clear-groups", "--"]
            func asMember(_ arguments: [String]) throws -> ShortCommand.Output {
                try ShortCommand.run("/usr/bin/setpriv", identity + [Checkout.binary, "api"] + arguments + ["--socket", socket])
            }
            func deposit(tap: String?, images: [String], probe: Bool = false) throws -> [[String: Any]] {
                // In the namespace (entered as root), then nobody: the tap is found by name there.
                let run = try ShortCommand.run("/usr/bin/env", (probe ? ["PROBE=1"] : []) + ["ip", "netns", "exec", namespace.name, "/usr/bin/setpriv"] + identity + ["/usr/bin/python3", "-c", Self.depositor, descriptorSocket, tap ?? "-"] + images)
                try #require(run.status == 0, "depositor: \(run.stderr)")
                return try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [[String: Any]])
            }
            func token(_ answer: [String: Any]) throws -> String { try #require(answer["token"] as? String, "\(answer)") }

            let first = try deposit(tap: "vmt-fd0", images: ["\(images.raw):r"])
            #expect(first[0]["kind"] as? String == "tap" && first[0]["tap"] as? String == "vmt-fd0", "\(first)")
            #expect(first[1]["kind"] as? String == "disk" && first[1]["writable"] as? Bool == false && first[1]["expires_in_seconds"] as? Int == 60, "\(first)")
            let (tapToken, diskToken) = (try token(first[0]), try token(first[1]))

            // A request that fails gives its tokens back: the template does not exist.
            let failed = try asMember(["POST", "/v1/clones", #"{"template": "nosuch", "disks": [{"fd": "\#(diskToken)", "overlay": true}]}"#])
            #expect(failed.status == 66, "\(failed.stdout)")
            // The tokens are nobody's: root may not spend them either.
            let foreign = try CLI.run(["api", "POST", "/v1/clones", #"{"template": "busybox", "nics": [{"backend": "fd", "fd": "\#(tapToken)"}]}"#, "--socket", socket])
            #expect(foreign.status == 64 && foreign.stdout.contains("not held for uid 0"), "\(foreign.stdout)")
            // A member may not name a tap, a namespace or a path: the server would open them.
            let byName = try asMember(["POST", "/v1/clones", #"{"template": "busybox", "nics": [{"backend": "tap", "tap": "vmt-fd0", "netns": "\#(namespace.path)"}]}"#])
            #expect(byName.status == 77 && byName.stdout.contains("Deposit a descriptor"), "\(byName.stdout)")
            let mixed = try asMember(["POST", "/v1/clones", #"{"template": "busybox", "disks": [{"fd": "\#(diskToken)", "path": "\#(images.raw)"}]}"#])
            #expect(mixed.status == 64 && mixed.stdout.contains("path= and fd= together"), "\(mixed.stdout)")
            let swapped = try asMember(["POST", "/v1/clones", #"{"template": "busybox", "nics": [{"backend": "fd", "fd": "\#(diskToken)"}]}"#])
            #expect(swapped.status == 64 && swapped.stdout.contains("holds a disk, not a tap"), "\(swapped.stdout)")

            let made = try asMember(["POST", "/v1/clones", #"{"template": "busybox", "name": "fd-1", "nics": [{"backend": "fd", "fd": "\#(tapToken)"}], "disks": [{"fd": "\#(diskToken)", "overlay": true}], "wait_devices": true}"#])
            try #require(made.status == 0, "\(made.stdout) \(made.stderr)")
            let clone = try JSONCoding.decoder().decode(CloneView.self, from: Data(made.stdout.utf8))
            let devices = clone.devices
            #expect(devices.map(\.id) == ["nic0", "disk0"] && devices.allSatisfy { $0.fromFD == true }, "\(devices)")
            #expect(devices.first?.tap == "vmt-fd0" && devices.first?.netns == nil && devices.last?.path == nil && devices.last?.overlay == true)
            #expect(clone.devicesReady == true, "wait_devices: the guest sees both")
            // QEMU holds them now; the server keeps no copy of a spent deposit.
            let serverFDs = "/proc/\(server.process.processIdentifier)/fd"
            let held = try FileManager.default.contentsOfDirectory(atPath: serverFDs).compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "\(serverFDs)/\($0)") }
            #expect(!held.contains("/dev/net/tun") && !held.contains(images.raw), "\(held)")

            // Spent: a second request with the same token finds nothing.
            let again = try asMember(["POST", "/v1/clones/fd-1/devices", #"{"nics": [{"backend": "fd", "fd": "\#(tapToken)"}]}"#])
            #expect(again.status == 64 && again.stdout.contains("is not held for uid"), "\(again.stdout)")

            // The guest is on the member's tap, and reads (and writes its overlay of) the image.
            let channel = ControlChannel(path: clone.controlSocket)
            #expect(try channel.request("ip eth0 10.79.0.2/24", timeout: .seconds(60)) == "ok")
            #expect(try channel.request("ping 10.79.0.1") == "ok", "clone to the namespace's bridge")
            #expect(try namespace.ping("10.79.0.2"), "the namespace to the clone")
            let serials = try channel.request("serials")
            let disk = try #require(serials.split(separator: " ").first { $0.hasSuffix("=\(clone.id)-disk0") }.map { String($0.prefix { $0 != "=" }) }, "\(serials)")
            #expect(try channel.request("read \(disk) 0 8") == hex("raw-base"))
            #expect(try channel.request("write \(disk) 0 \(hex("CLONE-FD"))") == "wrote 8")
            #expect(try channel.request("read \(disk) 0 8") == hex("CLONE-FD"))
            #expect(try sha256(images.raw) == before, "the image the member handed over read-only never changes")

            // `vmtemplate deposit`, for scripts: a read-write image, hot-plugged into the clone. A
            // member's qcow2 is refused: it could rewrite the header after it was checked (an
            // external data file QEMU would open); raw has no header QEMU reads.
            // The shell opens the image (as root: a checkout in a directory only root may enter, as a
            // fresh clone's is, lets nobody but setpriv itself start the binary), setpriv becomes
            // the member and starts `deposit` with it.
            func depositByShell(_ path: String, kind: String = "disk", redirect: String = "<>") throws -> ShortCommand.Output {
                try ShortCommand.run("/bin/sh", ["-c", "exec /usr/bin/setpriv \(identity.dropLast().joined(separator: " ")) -- \"$0\" deposit 3 --kind \(kind) --socket \"$1\" 3\(redirect)\"$2\"", Checkout.binary, socket, path])
            }
            let qcow2 = try depositByShell(images.qcow2)
            try #require(qcow2.status == 0, "\(qcow2.stdout) \(qcow2.stderr)")
            let qcow2Token = try token(try #require(try JSONSerialization.jsonObject(with: Data(qcow2.stdout.utf8)) as? [String: Any]))
            let refusedQCOW2 = try asMember(["POST", "/v1/clones/fd-1/devices", #"{"disks": [{"fd": "\#(qcow2Token)", "format": "qcow2"}]}"#])
            #expect(refusedQCOW2.status == 64 && refusedQCOW2.stdout.contains("could change the header"), "\(refusedQCOW2.stdout)")
            let extra = "\(images.directory)/extra.raw"
            try Shell.run("truncate -s 4M \(extra) && chown nobody \(extra)")
            let shell = try depositByShell(extra)
            try #require(shell.status == 0, "\(shell.stdout) \(shell.stderr)")
            let scripted = try #require(try JSONSerialization.jsonObject(with: Data(shell.stdout.utf8)) as? [String: Any])
            #expect(scripted["writable"] as? Bool == true)
            let added = try asMember(["POST", "/v1/clones/fd-1/devices", #"{"disks": [{"fd": "\#(try token(scripted))"}], "wait": true}"#])
            #expect(added.status == 0 && added.stdout.contains("\"from_fd\" : true"), "\(added.stdout)")
            let wrongMode = try depositByShell(images.raw, kind: "tap", redirect: "<")
            #expect(wrongMode.status == 64 && wrongMode.stderr.contains("is a disk, not the tap"), "\(wrongMode.stderr)")

            // What is not a tap or an image is refused where it arrives, in one line each.
            let probes = try deposit(tap: nil, images: ["\(images.raw):rw"], probe: true)
            let messages = probes.dropFirst().map { (($0["error"] as? [String: Any])?["message"] as? String) ?? "accepted: \($0)" }
            #expect(messages.count == 8)
            for (message, expected) in zip(messages, ["a character device, not a tap", "O_PATH handle", "neither a tap nor", "without a descriptor", "may hold only \"kind\"", "is a disk, not the tap", "not a local disk or memory one", "came with 40 descriptors"]) {
                #expect(message.contains(expected), "\(message)")
            }
            // A read-write descriptor for an overlay's base: QEMU would refuse it; said first.
            let rw = try token(probes[0])
            let wrongAccess = try asMember(["POST", "/v1/clones/fd-1/devices", #"{"disks": [{"fd": "\#(rw)", "overlay": true}]}"#])
            #expect(wrongAccess.status == 64 && wrongAccess.stdout.contains("open it O_RDONLY"), "\(wrongAccess.stdout)")

            #expect(try asMember(["DELETE", "/v1/clones/fd-1"]).status == 0)
            #expect(namespace.hasLink("vmt-fd0"), "the member's tap is the member's: it stays")
            server.process.terminate()
            server.process.waitUntilExit()
            #expect(!FileManager.default.fileExists(atPath: descriptorSocket), "the descriptor socket goes with the server")
        }

        @Test("the CLI takes inherited descriptors: --nic fd=N and --disk fd=N, and refuses one that is not open or not the kind", .enabled(if: Environment.isRoot, "needs root for network namespaces and taps"))
        func inheritedDescriptors() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { _ = try? CLI.run(["rm", "--all"] + store.arguments) }
            let namespace = try NetworkNamespace(bridgeAddress: "10.80.0.1/24", taps: ["vmt-cfd0"])
            defer { namespace.remove() }
            let images = try TestImages()
            defer { images.remove() }
            // Opens the tap (in the namespace) and the image as 3 and 4, then becomes the CLI.
            let launcher = #"""
                import fcntl, os, struct, sys
                tap = os.open('/dev/net/tun', os.O_RDWR)
                fcntl.ioctl(tap, 0x400454ca, struct.pack('16sH', b'vmt-cfd0', 0x0002 | 0x1000 | 0x4000))
                image = os.open(sys.argv[1], os.O_RDONLY)
                os.dup2(tap, 3)
                os.dup2(image, 4)
                # Python opens everything close-on-exec; these two go to the CLI.
                os.set_inheritable(3, True)
                os.set_inheritable(4, True)
                os.execv(sys.argv[2], sys.argv[2:])
                """#
            let result = try ShortCommand.run("/usr/sbin/ip", ["netns", "exec", namespace.name, "/usr/bin/python3", "-c", launcher, images.raw, Checkout.binary, "clone", SharedTemplate.name, "--nic", "fd=3", "--disk", "fd=4,readonly=on", "--wait-devices", "--json"] + store.arguments)
            try #require(result.status == 0, "\(result.stderr)")
            let clone = try JSONCoding.decoder().decode(CloneView.self, from: Data(result.stdout.utf8))
            #expect(clone.devices.map(\.fromFD) == [true, true] && clone.devices.first?.tap == "vmt-cfd0", "\(clone.devices)")
            let channel = ControlChannel(path: clone.controlSocket)
            #expect(clone.devicesReady == true)
            let configured = try channel.request("ip eth0 10.80.0.2/24", timeout: .seconds(60))
            #expect(configured == "ok")
            #expect(try namespace.ping("10.80.0.2"), "the namespace reaches the clone on the inherited tap")
            let serials = try channel.request("serials")
            let disk = try #require(serials.split(separator: " ").first { $0.hasSuffix("=\(clone.id)-disk0") }.map { String($0.prefix { $0 != "=" }) }, "\(serials)")
            #expect(try channel.request("read \(disk) 0 8") == hex("raw-base"))

            let notOpen = try CLI.run(["clone", SharedTemplate.name, "--disk", "fd=97,readonly=on"] + store.arguments)
            #expect(notOpen.status == 64 && notOpen.stderr.contains("fd 97 is not an open descriptor"), "\(notOpen.stderr)")
            let wrongKind = try ShortCommand.run("/bin/sh", ["-c", "exec \"$0\" clone busybox --nic fd=3 --store \"$1\" 3<\"$2\"", Checkout.binary, store.root, images.raw])
            #expect(wrongKind.status == 64 && wrongKind.stderr.contains("fd 3 is a disk, not a tap"), "\(wrongKind.stderr)")
            let readWrite = try ShortCommand.run("/bin/sh", ["-c", "exec \"$0\" clone busybox --disk fd=3,readonly=on --store \"$1\" 3<>\"$2\"", Checkout.binary, store.root, images.raw])
            #expect(readWrite.status == 64 && readWrite.stderr.contains("open it O_RDONLY"), "\(readWrite.stderr)")
            #expect(try TemplateStore(root: store.root).clones().records.count == 1, "the refused clones left nothing")
        }
    }
}

/// The deposits' bookkeeping, without a server: who may use a token, and when.
@Suite("descriptor deposits")
struct DescriptorDepositsTests {
    func image() throws -> GivenDescriptor {
        let path = "/tmp/vmt-deposit-\(UUID().uuidString.prefix(8))"
        try Data(count: 4096).write(to: URL(fileURLWithPath: path))
        defer { unlink(path) }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        return try GivenDescriptor.inspecting(fd, label: "test image", fromOwner: false)
    }

    @Test("a token serves its uid once; a failed request gives it back; a claimed token is not lent twice; an expired one is gone; each caller is bounded")
    func bookkeeping() async throws {
        let deposits = DescriptorDeposits()
        let token = DescriptorDeposits.newToken()
        #expect(DescriptorDeposits.isToken(token) && !DescriptorDeposits.isToken("fd-" + String(repeating: "g", count: 32)))
        try deposits.deposit(try image(), token: token, uid: 1000, isOwner: false)
        #expect(throws: VMTemplateError.self) { try deposits.claim(token, uid: 1001, kind: .disk) }
        #expect(throws: VMTemplateError.self) { try deposits.claim(token, uid: 1000, kind: .tap) }
        do {
            try await deposits.withClaims(uid: 1000) { lookup in
                _ = try DiskSpec(parsing: "fd=\(token),readonly=on", descriptors: lookup)
                // A concurrent request naming it meanwhile is refused.
                let busy = #expect(throws: VMTemplateError.self) { try deposits.claim(token, uid: 1000, kind: .disk) }
                #expect(busy?.code == .busy)
                throw VMTemplateError(.notFound, "the request failed")
            }
            Issue.record("the request should have failed")
        } catch {
            #expect((error as? VMTemplateError)?.message == "the request failed")
        }
        let spec = try await deposits.withClaims(uid: 1000) { lookup in try DiskSpec(parsing: "fd=\(token),readonly=on", descriptors: lookup) }
        #expect(spec.path == nil)
        #expect(deposits.count == 0, "spent by the request that succeeded")
        #expect(throws: VMTemplateError.self) { try deposits.claim(token, uid: 1000, kind: .disk) }

        // A request that fails after QEMU got a copy (a second device failed) spends the token of
        // the one attached: it must not attach the same tap or image twice.
        let attachedToken = DescriptorDeposits.newToken()
        let attachedImage = try image()
        try deposits.deposit(attachedImage, token: attachedToken, uid: 1000, isOwner: false)
        _ = try? await deposits.withClaims(uid: 1000) { lookup -> Int in
            _ = try DiskSpec(parsing: "fd=\(attachedToken),readonly=on", descriptors: lookup)
            attachedImage.markAttached()
            throw VMTemplateError(.limitExceeded, "no free slot for the second device")
        }
        #expect(deposits.count == 0, "spent, though the request failed")

        let shortLived = DescriptorDeposits(lifetime: .zero)
        try shortLived.deposit(try image(), token: DescriptorDeposits.newToken(), uid: 1000, isOwner: false)
        shortLived.sweep()
        #expect(shortLived.count == 0, "expired")

        let bounded = DescriptorDeposits()
        for _ in 0..<DescriptorDeposits.perCaller { try bounded.deposit(try image(), token: DescriptorDeposits.newToken(), uid: 1000, isOwner: false) }
        let refused = #expect(throws: VMTemplateError.self) { try bounded.deposit(try image(), token: DescriptorDeposits.newToken(), uid: 1000, isOwner: false) }
        #expect(refused?.code == .limitExceeded)
        try bounded.deposit(try image(), token: DescriptorDeposits.newToken(), uid: 0, isOwner: true)
    }
}
