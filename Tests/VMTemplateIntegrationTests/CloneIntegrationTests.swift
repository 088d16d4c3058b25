import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// `vmtemplate clone` end to end on the shared busybox template.
extension RealGuests {
    @Suite("clone on a real guest", .serialized)
    struct CloneIntegrationTests {
        struct Clone: Decodable {
            var id: String
            var name: String
            var template: String
            var pid: Int32
            var state: String
            var qmp_socket: String
            var serial_log: String
            var control_socket: String
            var vmgenid: String?
        }

        func clone(_ store: TemporaryStore, _ extra: [String] = []) throws -> Clone {
            let result = try CLI.run(["clone", SharedTemplate.name, "--json"] + extra + store.arguments)
            try #require(result.status == 0, "clone failed: \(result.stderr)")
            return try JSONDecoder().decode(Clone.self, from: Data(result.stdout.utf8))
        }

        func removeAll(_ store: TemporaryStore) throws {
            let result = try CLI.run(["rm", "--all"] + store.arguments)
            #expect(result.status == 0, "rm --all: \(result.stderr)")
        }

        @Test("clones answer on their control channels, have distinct generation IDs, and open the template read-only")
        func clonesAreIndependent() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let clones = try (0..<3).map { _ in try clone(store) }
            #expect(Set(clones.map(\.id)).count == 3)
            let memoryFile = "\(store.templateDirectory(SharedTemplate.name))/memory"
            var generationIDs: Set<String> = []
            for clone in clones {
                #expect(clone.state == "running")
                #expect(try ControlChannel(path: clone.control_socket).request("ping") == "pong")

                let qmp = try await QMPClient.connect(socketPath: clone.qmp_socket, timeout: .seconds(5))
                let guid = try await qmp.queryVMGenerationID()
                #expect(guid.lowercased() == clone.vmgenid)
                generationIDs.insert(guid)
                #expect(try await qmp.queryStatus().running)
                qmp.close()

                let flags = try OpenFiles.flags(pid: clone.pid, path: memoryFile)
                #expect(flags.count >= 1, "QEMU must hold the template RAM file open")
                for flag in flags {
                    #expect(flag & O_ACCMODE == O_RDONLY, "template opened with flags \(String(flag, radix: 8)), not read-only")
                }
            }
            #expect(generationIDs.count == 3, "every clone gets its own generation ID")
        }

        @Test("a guest writing 32 MiB leaves the template unchanged and shows as its copy-on-write")
        func dirtyLeavesTemplateIntact() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let manifest = try TemplateStore(root: store.root).template(named: try EntityName(SharedTemplate.name)).manifest
            let busy = try clone(store)
            let idle = try clone(store)
            #expect(try ControlChannel(path: busy.control_socket).request("dirty 32", timeout: .seconds(60)) == "dirtied 32")

            let memoryFile = "\(store.templateDirectory(SharedTemplate.name))/memory"
            #expect(try FileDigest.sha256(path: memoryFile) == manifest.memory.sha256)

            let busyUsage = try CloneMemoryUsage.measure(pid: busy.pid, templateFile: memoryFile)
            let idleUsage = try CloneMemoryUsage.measure(pid: idle.pid, templateFile: memoryFile)
            #expect(busyUsage.copyOnWriteBytes >= 32 * 1024 * 1024)
            #expect(idleUsage.copyOnWriteBytes < 16 * 1024 * 1024)
            #expect(try ControlChannel(path: idle.control_socket).request("ping") == "pong")
        }

        @Test("the busybox guest's control channel answers time, settime, hostname, ifaces and disks")
        func controlChannelRequests() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let clone = try clone(store)
            let channel = ControlChannel(path: clone.control_socket)
            let guestTime = try #require(Int(try channel.request("time", timeout: .seconds(60))))
            #expect(guestTime > 1_700_000_000)
            #expect(try channel.request("settime 1000000000") == "time 1000000000")
            #expect(try channel.request("time").hasPrefix("10000000"))
            #expect(try channel.request("hostname") == clone.name, "the busybox recipe has guest_clock control-channel: the clone's name")
            #expect(try channel.request("hostname web-7") == "hostname web-7")
            #expect(try channel.request("hostname bad/name").hasPrefix("error:"))
            #expect(try channel.request("ifaces").contains("lo=00:00:00:00:00:00"))
            #expect(try channel.request("disks") == "", "no disk until one is hot-plugged")
            #expect(try channel.request("read vda 0 1").hasPrefix("error: no block device"))
            #expect(try channel.request("write vda 0 zz").hasPrefix("error:"))
        }

        @Test("a clone's guest gets the host's time and its own hostname when it starts, and a runtime's first request is answered after them")
        func clockAndHostname() async throws {
            // A template of its own, made from the busybox recipe with "guest_clock": "control-channel".
            let own = try TemporaryStore("clock")
            defer { own.remove() }
            let recipePath = "\(own.root)-recipe.json"
            var recipe = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Checkout.busyboxRecipe))) as? [String: Any] ?? [:]
            recipe["guest_clock"] = "control-channel"
            for key in ["kernel", "initrd"] { recipe[key] = "\(Checkout.root)/templates/busybox/\(recipe[key] as? String ?? "")" }
            try JSONSerialization.data(withJSONObject: recipe).write(to: URL(fileURLWithPath: recipePath))
            defer { unlink(recipePath) }
            let created = try CLI.run(["create", "clocked", "--recipe", recipePath] + own.arguments)
            try #require(created.status == 0, "\(created.stderr)")
            let manifest = try TemplateStore(root: own.root).template(named: try EntityName("clocked")).manifest
            #expect(manifest.guestClock == .controlChannel)
            // The template's clock stopped when it was paused: clone it a while later.
            try await Task.sleep(for: .seconds(8))
            let result = try CLI.run(["clone", "clocked", "--name", "clocked-1", "--json"] + own.arguments)
            try #require(result.status == 0, "\(result.stderr)")
            #expect(result.stdout.contains("\"clock\":\"requested\""))
            let clone = try JSONDecoder().decode(Clone.self, from: Data(result.stdout.utf8))
            let channel = ControlChannel(path: clone.control_socket)
            // The first request a runtime sends gets its own reply, not the helper's.
            #expect(try channel.request("ping", timeout: .seconds(60)) == "pong")
            let guestTime = try #require(Int(try channel.request("time")))
            #expect(abs(guestTime - Int(Date().timeIntervalSince1970)) <= 2, "guest \(guestTime), host \(Int(Date().timeIntervalSince1970))")
            #expect(try channel.request("hostname") == "clocked-1")
            _ = try CLI.run(["rm", "--all"] + own.arguments)
        }

        @Test("as root, a clone's QEMU is sandboxed and runs as vmtemplate-qemu, even from a private store and a group-restricted template", .enabled(if: Environment.isRoot && getpwnam("vmtemplate-qemu") != nil, "needs root and the vmtemplate-qemu user (scripts/setup)"))
        func confinedClone() async throws {
            let parent = try TemporaryStore("priv")
            defer { parent.remove() }
            chmod(parent.root, 0o700)
            let store = "\(parent.root)/store"
            let created = try CLI.run(["create", "g", "--recipe", Checkout.busyboxRecipe, "--group", "root", "--store", store])
            try #require(created.status == 0, "\(created.stderr)")
            let result = try CLI.run(["clone", "g", "--json", "--store", store])
            try #require(result.status == 0, "\(result.stderr)")
            let clone = try JSONDecoder().decode(Clone.self, from: Data(result.stdout.utf8))
            #expect(try ControlChannel(path: clone.control_socket).request("ping", timeout: .seconds(60)) == "pong")
            var info = stat()
            #expect(stat("/proc/\(clone.pid)", &info) == 0)
            #expect(info.st_uid == getpwnam("vmtemplate-qemu")?.pointee.pw_uid, "QEMU dropped to its user although it cannot reach the state file by path")
            let arguments = (try? String(contentsOfFile: "/proc/\(clone.pid)/cmdline", encoding: .utf8))?.split(separator: "\0").map(String.init) ?? []
            #expect(arguments.contains { $0.hasPrefix("on,obsolete=deny") }, "QEMU runs under -sandbox")
            #expect(try FileStatus.read(path: "\(store)/templates/g/state").mode == 0o440)
            _ = try CLI.run(["rm", "--all", "--store", store])
        }

        @Test("send refuses a line with a newline or over 4096 bytes (exit 64), and skips a late reply meant for an earlier caller")
        func sendFraming() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let made = try clone(store, ["--name", "framed"])
            let channel = ControlChannel(path: made.control_socket)
            #expect(try channel.request("ping", timeout: .seconds(60)) == "pong")
            for line in ["ping\nhostname evil", "ping\thostname evil", "ping\u{1b}[2J", String(repeating: "x", count: 5000)] {
                let refused = try CLI.run(["send", made.id, line] + store.arguments)
                #expect(refused.status == 64, "\(refused.status) \(refused.stderr)")
            }
            #expect(try channel.request("hostname") == "framed", "no second request reached the guest")
            // A caller that gives up before its slow reply comes: the next caller gets its own.
            let early = try channel.connect()
            try channel.send(["hash 48"], on: early)
            close(early)
            let next = try CLI.run(["send", made.id, "ping"] + store.arguments)
            #expect(next.status == 0 && next.stdout == "pong\n", "\(next.stdout) \(next.stderr)")
            #expect(try CLI.run(["send", made.id, "hostname"] + store.arguments).stdout == "framed\n")
        }

        @Test("root's send in another user's store follows no link out of it to a socket of root's", .enabled(if: Environment.isRoot, "needs root and another user"))
        func sendFollowsNoLink() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let made = try clone(store, ["--name", "linked"])
            // A store of nobody's, with a record that holds up and sockets that are links to the
            // real clone's (root's).
            let theirs = try TemporaryStore("theirs")
            defer { theirs.remove() }
            let directory = theirs.cloneDirectory(made.id)
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            var record = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(store.cloneDirectory(made.id))/record.json"))) as? [String: Any])
            record["template_store"] = store.root
            try JSONSerialization.data(withJSONObject: record).write(to: URL(fileURLWithPath: "\(directory)/record.json"))
            for socket in ["control.sock", "qmp.sock"] {
                try FileManager.default.createSymbolicLink(atPath: "\(directory)/\(socket)", withDestinationPath: "\(store.cloneDirectory(made.id))/\(socket)")
            }
            _ = try Shell.run("chown -hR nobody:nogroup \(theirs.root)")
            let sent = try CLI.run(["send", made.id, "hostname"] + theirs.arguments)
            #expect(sent.status != 0 && !sent.stdout.contains("linked") && sent.stderr.contains("link"), "\(sent.status) \(sent.stdout) \(sent.stderr)")
        }

        @Test("a name that is also the start of another clone's ID is refused as ambiguous; a full ID and a plain prefix still find their clone")
        func ambiguousNames() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let victim = try clone(store)
            let prefix = String(victim.id.prefix(4))
            let squatter = try clone(store, ["--name", prefix])
            let ambiguous = try CLI.run(["inspect", prefix, "--json"] + store.arguments)
            #expect(ambiguous.status == 64 && ambiguous.stderr.contains("use a full ID"), "\(ambiguous.status) \(ambiguous.stderr)")
            #expect(ambiguous.stdout.hasPrefix("{\"error\""), "neither clone is shown: \(ambiguous.stdout)")
            #expect(try CLI.run(["inspect", victim.id, "--json"] + store.arguments).stdout.contains(victim.id))
            #expect(try CLI.run(["inspect", squatter.id, "--json"] + store.arguments).stdout.contains(squatter.id))
            #expect(try CLI.run(["inspect", String(victim.id.prefix(10)), "--json"] + store.arguments).stdout.contains(victim.id))
        }

        @Test("a user outside a --group template's group is told permission denied (77), not that the template is damaged", .enabled(if: Environment.isRoot, "needs root to switch to another user"))
        func groupTemplateRefused() async throws {
            let store = try TemporaryStore("grp")
            defer { store.remove() }
            let created = try CLI.run(["create", "g", "--recipe", Checkout.busyboxRecipe, "--group", "root"] + store.arguments)
            try #require(created.status == 0, "\(created.stderr)")
            let own = "/tmp/vmt-nobody-\(UUID().uuidString.prefix(8))"
            defer { TemporaryStore(existing: own).remove() }
            let refused = try Reliability.asNobody([Checkout.binary, "clone", "g", "--store", own, "--template-store", store.root])
            #expect(refused.status == 77 && refused.stderr.contains("may be read only by its group"), "\(refused.status) \(refused.stderr)")
            // A disk the user may not read: permission denied too, not 'Bad file descriptor'.
            let shared = try await SharedTemplate.shared.store()
            let shadow = try Reliability.asNobody([Checkout.binary, "clone", SharedTemplate.name, "--store", own, "--template-store", shared.root, "--disk", "path=/etc/shadow,readonly=on"])
            #expect(shadow.status == 77 && shadow.stderr.contains("cannot be opened for reading by this user"), "\(shadow.status) \(shadow.stderr)")
        }

        @Test("list -q prints IDs only; inspect without --json prints a readable view of a clone and of a template")
        func humanViews() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let made = try clone(store, ["--nic", "user"])
            let quiet = try CLI.run(["list", "-q"] + store.arguments)
            #expect(quiet.stdout == "\(made.id)\n")
            let inspected = try CLI.run(["inspect", made.id] + store.arguments)
            #expect(inspected.status == 0 && !inspected.stdout.hasPrefix("{"))
            #expect(inspected.stdout.contains("state           running") && inspected.stdout.contains("device          nic0"), "\(inspected.stdout)")
            let template = try CLI.run(["inspect", SharedTemplate.name] + store.arguments)
            #expect(template.stdout.contains("hot-plug slots  4") && template.stdout.contains("file memory"), "\(template.stdout)")
            #expect(try CLI.run(["inspect", made.id, "--json"] + store.arguments).stdout.hasPrefix("{"))
        }

        @Test("--no-vmgenid keeps the template's generation ID")
        func noVMGenID() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let clone = try clone(store, ["--no-vmgenid"])
            #expect(clone.vmgenid == nil)
            #expect(try ControlChannel(path: clone.control_socket).request("ping") == "pong")
        }

        @Test("a non-root user clones a root-owned read-only template into a store of their own", .enabled(if: Environment.isRoot, "needs root to own the template and switch to another user"))
        func unprivilegedClone() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let memoryFile = "\(store.templateDirectory(SharedTemplate.name))/memory"
            let status = try FileStatus.read(path: memoryFile)
            #expect(status.ownerUID == 0 && status.mode == 0o444)
            // nobody's own store: a directory nobody creates itself.
            let own = "/tmp/vmt-nobody-\(UUID().uuidString.prefix(8))"
            defer { TemporaryStore(existing: own).remove() }
            func asNobody(_ arguments: [String]) throws -> ShortCommand.Output {
                try ShortCommand.run("/usr/bin/setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", Checkout.binary] + arguments)
            }
            // Root's store is root's alone: nobody can no longer write a clone into it.
            let refused = try asNobody(["clone", SharedTemplate.name, "--store", store.root])
            #expect(refused.status != 0)
            #expect(refused.stderr.contains("only its owner changes a store"), "\(refused.stderr)")
            #expect(refused.stderr.contains("--template-store \(store.root)"))

            let result = try asNobody(["clone", SharedTemplate.name, "--json", "--store", own, "--template-store", store.root])
            try #require(result.status == 0, "clone as nobody failed: \(result.stderr)")
            let clone = try JSONDecoder().decode(Clone.self, from: Data(result.stdout.utf8))
            #expect(clone.control_socket.hasPrefix(own), "the clone lives in nobody's store")
            let reply = Result { try ControlChannel(path: clone.control_socket).request("ping") }
            #expect((try? reply.get()) == "pong", "the first request's reply: \(reply), the helper's log: \((try? String(contentsOfFile: "\(own)/clones/\(clone.id)/guest-setup.log", encoding: .utf8)) ?? "none")")
            #expect(try FileStatus.read(path: "\(own)/clones/\(clone.id)").ownerUID == 65534)
            // An unprivileged QEMU runs under the seccomp sandbox too, unable to gain privileges.
            let procStatus = (try? String(contentsOfFile: "/proc/\(clone.pid)/status", encoding: .utf8)) ?? ""
            #expect(procStatus.contains("Seccomp:\t2") && procStatus.contains("NoNewPrivs:\t1"), "\(procStatus.split(separator: "\n").filter { $0.hasPrefix("Seccomp") || $0.hasPrefix("NoNewPrivs") })")
            // Root's listing of nobody's store is read-only and shows the clone.
            let listing = try CLI.run(["list", "--json", "--store", own])
            #expect(listing.stdout.contains(clone.id))
            let removed = try asNobody(["rm", clone.id, "--store", own])
            #expect(removed.status == 0, "\(removed.stderr)")
        }

        @Test("rm stops the QEMU and removes the record; a SIGKILLed clone shows as exited and gc cleans it")
        func removeAndCollect() async throws {
            let store = try await SharedTemplate.shared.store()
            defer { try? removeAll(store) }
            let first = try clone(store, ["--name", "first"])
            let second = try clone(store, ["--name", "second"])

            let rm = try CLI.run(["rm", "first"] + store.arguments)
            #expect(rm.status == 0)
            #expect(rm.stdout.contains("quit"))
            #expect(await eventually(timeout: .seconds(5)) { kill(first.pid, 0) != 0 })
            #expect(!FileManager.default.fileExists(atPath: store.cloneDirectory(first.id)))

            kill(second.pid, SIGKILL)
            #expect(await eventually(timeout: .seconds(5)) { ProcessStat.read(pid: second.pid).map { $0.state == "Z" } ?? true })
            let list = try CLI.run(["list", "--json"] + store.arguments)
            #expect(list.stdout.contains("\"state\":\"exited\""))
            let gc = try CLI.run(["gc"] + store.arguments)
            #expect(gc.stdout.contains("removed clone \(second.id)"), "gc says which clones it removed: \(gc.stdout)")
            #expect(!gc.stdout.contains("nothing to clean up"))
            #expect(!FileManager.default.fileExists(atPath: store.cloneDirectory(second.id)))

            let unknown = try CLI.run(["rm", "no-such-clone"] + store.arguments)
            #expect(unknown.status != 0)
            #expect(unknown.stderr.contains("no clone with ID or name 'no-such-clone'"))
        }
    }

    /// Bad input to `clone`: a clear error, no QEMU left, no record left.
    @Suite("clone refuses bad input", .serialized)
    struct CloneBadInputTests {
        func expectRefused(_ arguments: [String], store: TemporaryStore, saying expected: String) throws {
            let qemuBefore = Set(QEMUProcesses.using(store.root))
            let before = Set((try? FileManager.default.contentsOfDirectory(atPath: "\(store.root)/clones")) ?? [])
            let result = try CLI.run(["clone"] + arguments + store.arguments)
            #expect(result.status != 0)
            #expect(result.stderr.contains(expected), "stderr: \(result.stderr)")
            let after = Set((try? FileManager.default.contentsOfDirectory(atPath: "\(store.root)/clones")) ?? [])
            #expect(after == before, "no clone directory may be left behind")
            #expect(Set(QEMUProcesses.using(store.root)).isSubset(of: qemuBefore), "no QEMU may be left behind")
        }

        /// Copies the shared template under another name (a copy has new inodes: a changed template).
        func copyTemplate(_ store: TemporaryStore, as name: String) throws -> String {
            let target = store.templateDirectory(name)
            let copy = try ShortCommand.run("/bin/cp", ["-a", store.templateDirectory(SharedTemplate.name), target])
            try #require(copy.status == 0)
            return target
        }

        func removeTemplate(_ directory: String) {
            _ = try? ShortCommand.run("/bin/chmod", ["-R", "u+w", directory])
            try? FileManager.default.removeItem(atPath: directory)
        }

        @Test("an unknown template")
        func unknownTemplate() async throws {
            let store = try await SharedTemplate.shared.store()
            try expectRefused(["nope"], store: store, saying: "no template named 'nope'")
        }

        @Test("a template whose files were replaced, changed or removed")
        func tamperedTemplate() async throws {
            let store = try await SharedTemplate.shared.store()
            let copy = try copyTemplate(store, as: "copied")
            defer { removeTemplate(copy) }
            // A copy under another name carries the original's manifest.
            try expectRefused(["copied"], store: store, saying: "holds the manifest of 'busybox'")
            removeTemplate(copy)

            // A copy under the same name (in a second store) has new inodes: not the template that was made.
            let other = try TemporaryStore("tamper")
            defer { other.remove() }
            _ = try TemplateStore(root: other.root)
            let copied = try ShortCommand.run("/bin/cp", ["-a", store.templateDirectory(SharedTemplate.name), other.templateDirectory(SharedTemplate.name)])
            try #require(copied.status == 0)
            try expectRefused([SharedTemplate.name], store: other, saying: "does not match its manifest")
            // Rewritten in place: the modification time changes.
            let otherMemory = "\(other.templateDirectory(SharedTemplate.name))/memory"
            #expect(utimes(otherMemory, nil) == 0)
            try expectRefused([SharedTemplate.name], store: other, saying: "replaced or rewritten")

            // A file removed.
            chmod(other.templateDirectory(SharedTemplate.name), 0o755)
            unlink("\(other.templateDirectory(SharedTemplate.name))/state")
            try expectRefused([SharedTemplate.name], store: other, saying: "missing its state file")
            // list marks it, in JSON and to people.
            let listed = try CLI.run(["list", "--json", "--store", other.root])
            #expect(listed.stdout.contains("\"missing_files\":[\"state\"]"), "\(listed.stdout)")
            let table = try CLI.run(["list", "--store", other.root])
            #expect(table.stdout.contains("MISSING state") && table.stderr.contains("rm-template"), "\(table.stdout) \(table.stderr)")
        }

        @Test("QEMU dying during start-up shows its error")
        func qemuDies() async throws {
            let store = try await SharedTemplate.shared.store()
            let wrapper = try QEMUWrapper(body: "exec qemu-system-x86_64 \"$@\" -no-such-option")
            defer { wrapper.remove() }
            try expectRefused([SharedTemplate.name, "--qemu", wrapper.path], store: store, saying: "QEMU exited")
        }

        @Test("a restore that does not finish in time times out, leaving nothing")
        func restoreTimeout() async throws {
            let store = try await SharedTemplate.shared.store()
            let wrapper = try QEMUWrapper(body: "sleep 30; exec qemu-system-x86_64 \"$@\"")
            defer { wrapper.remove() }
            try expectRefused([SharedTemplate.name, "--qemu", wrapper.path, "--timeout", "1"], store: store, saying: "from template 'busybox' took longer than 1 s: the machine may be overloaded; try again or raise --timeout.")
        }

        @Test("a clone name that is taken, or invalid")
        func nameTaken() async throws {
            let store = try await SharedTemplate.shared.store()
            let first = try CLI.run(["clone", SharedTemplate.name, "--name", "taken"] + store.arguments)
            #expect(first.status == 0)
            defer { _ = try? CLI.run(["rm", "taken"] + store.arguments) }
            // A retried create gets the clone it made, "created": false; one that differs is refused.
            let retried = try CLI.run(["clone", SharedTemplate.name, "--name", "taken", "--json"] + store.arguments)
            let view = try JSONCoding.decoder().decode(CloneView.self, from: Data(retried.stdout.utf8))
            #expect(retried.status == 0 && view.created == false && view.id == first.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "\(retried.stdout) \(retried.stderr)")
            try expectRefused([SharedTemplate.name, "--name", "taken", "--nic", "user"], store: store, saying: "a clone named 'taken' already exists with another set of devices")
            try expectRefused([SharedTemplate.name, "--name", "../x"], store: store, saying: "clone name")
            // Names and IDs share one space: a clone may not be named after another's ID.
            let id = first.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            try expectRefused([SharedTemplate.name, "--name", id], store: store, saying: "already exists")
            // A name whose clone is gone without 'rm' (its QEMU killed, then gc) is free again: the
            // name index's entry is stale and replaced.
            let record = try #require(TemplateStore(root: store.root).cloneRecord(id))
            kill(try #require(record.qemu?.pid), SIGKILL)
            #expect(await eventually { record.qemu?.isAlive == false })
            _ = try CLI.run(["gc"] + store.arguments)
            #expect(!FileManager.default.fileExists(atPath: "\(store.root)/names/taken"), "gc removes the entry of a clone that is gone")
            let again = try CLI.run(["clone", SharedTemplate.name, "--name", "taken"] + store.arguments)
            #expect(again.status == 0, "\(again.stderr)")
            #expect(try CLI.run(["send", "taken", "ping"] + store.arguments).stdout == "pong\n")
        }
    }

}

/// A script that stands in for QEMU: answers --version and probes like the real one, then runs `body`.
struct QEMUWrapper {
    let path: String

    init(body: String) throws {
        path = NSTemporaryDirectory() + "qemu-wrapper-\(UUID().uuidString.prefix(8))"
        let script = """
            #!/bin/sh
            case "$1" in --version|-machine|-object) exec qemu-system-x86_64 "$@" ;; esac
            \(body)

            """
        try Data(script.utf8).write(to: URL(fileURLWithPath: path))
        chmod(path, 0o755)
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// Open file descriptors of a process, from /proc/PID/fd and /proc/PID/fdinfo.
enum OpenFiles {
    /// The open flags of every descriptor of `pid` that refers to `path`.
    static func flags(pid: Int32, path: String) throws -> [Int32] {
        let descriptors = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")
        return descriptors.compactMap { fd in
            guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)"), target == path,
                  let info = try? String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8),
                  let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags:") })
            else { return nil }
            return Int32(line.dropFirst("flags:".count).trimmingCharacters(in: .whitespaces), radix: 8)
        }
    }
}
