import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// Warm pools on real guests: filling, concurrent hand-outs, dead members, draining.
extension RealGuests {
    @Suite("warm pools on real guests", .serialized)
    struct PoolIntegrationTests {
        struct Clone: Decodable {
            var id: String
            var name: String
            var control_socket: String
            var vmgenid: String?
            var from_pool: Bool
            var devices: [AttachedDevice]
        }

        /// A store of its own with the busybox template (pools must not leave members behind in
        /// the shared store, whose other tests count its clones).
        func poolStore(_ label: String) throws -> TemporaryStore {
            try TemporaryStore.withTemplates(label)
        }

        func run(_ arguments: [String], _ store: TemporaryStore) throws -> CommandResult {
            let result = try CLI.run(arguments + store.arguments)
            #expect(result.status == 0, "\(arguments): \(result.stderr)")
            return result
        }

        func poolStatus(_ store: TemporaryStore) throws -> [WarmPool.Status] {
            try JSONDecoder().decode([WarmPool.Status].self, from: Data(try run(["pool", "ls", "--json"], store).stdout.utf8))
        }

        func cleanUp(_ store: TemporaryStore) {
            _ = try? CLI.run(["pool", "set", "busybox", "--size", "0"] + store.arguments)
            _ = try? CLI.run(["rm", "--all"] + store.arguments)
            store.remove()
        }

        @Test("a pool of 4 is filled; 4 concurrent clones each get a distinct warmed member that answers, with distinct vmgenids; draining stops every member")
        func fillHandOutDrain() async throws {
            let store = try poolStore("pool")
            defer { cleanUp(store) }
            _ = try run(["pool", "set", "busybox", "--size", "4"], store)
            _ = try run(["pool", "fill", "busybox"], store)
            #expect(try poolStatus(store) == [WarmPool.Status(template: "busybox", size: 4, ready: 4, filling: 0)])
            let members = try TemplateStore(root: store.root).clones().records
            #expect(members.count == 4 && members.allSatisfy { $0.state == .pooled })
            #expect(try run(["list"], store).stdout.components(separatedBy: "pooled").count - 1 == 4, "list shows them as pooled")

            let started = try (0..<4).map { index in try CLI.start(["clone", "busybox", "--json", "--name", "web-\(index)"] + store.arguments) }
            for process in started { process.process.waitUntilExit() }
            let clones = try started.map { process -> Clone in
                let result = process.result()
                try #require(result.status == 0, "\(result.stderr)")
                return try JSONDecoder().decode(Clone.self, from: Data(result.stdout.utf8))
            }
            #expect(clones.allSatisfy { $0.from_pool })
            #expect(Set(clones.map(\.id)) == Set(members.map(\.id)), "each got a member of its own")
            #expect(Set(clones.compactMap(\.vmgenid)).count == 4)
            for clone in clones {
                let channel = ControlChannel(path: clone.control_socket)
                #expect(try channel.request("ping", timeout: .seconds(30)) == "pong")
                #expect(try channel.request("hostname") == clone.name, "the member got its name as hostname")
                let guestTime = try #require(Int(try channel.request("time")))
                #expect(abs(guestTime - Int(Date().timeIntervalSince1970)) <= 2)
            }
            #expect(try poolStatus(store).first?.ready == 0)
            // The pool is empty: the next clone is a fresh one.
            let fresh = try JSONDecoder().decode(Clone.self, from: Data(try run(["clone", "busybox", "--json"], store).stdout.utf8))
            #expect(!fresh.from_pool)

            _ = try run(["pool", "fill", "busybox"], store)
            let pooled = try TemplateStore(root: store.root).clones().records.filter { $0.state == .pooled }
            #expect(pooled.count == 4)
            let pids = pooled.compactMap { $0.qemu?.pid }
            _ = try run(["pool", "set", "busybox", "--size", "0"], store)
            #expect(try TemplateStore(root: store.root).clones().records.allSatisfy { $0.state != .pooled }, "draining removed every member")
            #expect(await eventually { pids.allSatisfy { kill($0, 0) != 0 || ProcessStat.read(pid: $0)?.state == "Z" } }, "and stopped their QEMU")
            #expect(try poolStatus(store).isEmpty)
        }

        @Test("a member whose QEMU was SIGKILLed while pooled is never handed out, and gc and fill replace it")
        func deadMember() async throws {
            let store = try poolStore("pooldead")
            defer { cleanUp(store) }
            _ = try run(["pool", "set", "busybox", "--size", "2"], store)
            _ = try run(["pool", "fill", "busybox"], store)
            let members = try TemplateStore(root: store.root).clones().records
            let victim = try #require(members.first)
            kill(try #require(victim.qemu?.pid), SIGKILL)
            #expect(await eventually { victim.qemu?.isAlive == false })
            let first = try JSONDecoder().decode(Clone.self, from: Data(try run(["clone", "busybox", "--json"], store).stdout.utf8))
            let second = try JSONDecoder().decode(Clone.self, from: Data(try run(["clone", "busybox", "--json"], store).stdout.utf8))
            #expect(first.id != victim.id && second.id != victim.id, "the dead member was not handed out")
            #expect([first, second].filter { $0.from_pool }.count == 1, "one live member, then a fresh clone")
            for clone in [first, second] {
                #expect(try ControlChannel(path: clone.control_socket).request("ping", timeout: .seconds(30)) == "pong")
            }
            _ = try run(["gc"], store)
            _ = try run(["pool", "fill", "busybox"], store)
            #expect(try poolStatus(store).first?.ready == 2, "refilled")
        }

        @Test("clone --json says where the time went: a fresh clone spawned and restored, a hand-out neither; the phases add up to no more than the total")
        func timings() async throws {
            let store = try poolStore("pooltime")
            defer { cleanUp(store) }
            struct Timed: Decodable {
                var from_pool: Bool
                var timings: CloneTimings
            }
            _ = try run(["pool", "set", "busybox", "--size", "1"], store)
            _ = try run(["pool", "fill", "busybox"], store)
            let handedOut = try JSONDecoder().decode(Timed.self, from: Data(try run(["clone", "busybox", "--json"], store).stdout.utf8))
            let fresh = try JSONDecoder().decode(Timed.self, from: Data(try run(["clone", "busybox", "--json", "--no-pool", "--nic", "user"], store).stdout.utf8))
            #expect(handedOut.from_pool && !fresh.from_pool)
            #expect(handedOut.timings.spawn == 0 && handedOut.timings.restore == 0)
            #expect(fresh.timings.spawn > 0 && fresh.timings.restore > 0 && fresh.timings.devices > 0 && fresh.timings.admission > 0)
            for timings in [handedOut.timings, fresh.timings] {
                let phases = [timings.admission, timings.spawn, timings.restore, timings.devices, timings.resume, timings.records]
                #expect(phases.allSatisfy { $0 >= 0 } && phases.reduce(0, +) <= timings.total + 1e-6, "\(timings)")
            }
            let record = try #require(try TemplateStore(root: store.root).clones().records.first { $0.fromPool != true && $0.state == .running })
            #expect(record.timings?.spawn == fresh.timings.spawn, "the record keeps them")
        }

        @Test("a member that pins another template's identity (an earlier template of the same name) is never handed out, and gc stops it")
        func memberOfAnotherTemplate() async throws {
            let store = try poolStore("poolid")
            defer { cleanUp(store) }
            let templates = try TemplateStore(root: store.root)
            _ = try run(["pool", "set", "busybox", "--size", "2"], store)
            _ = try run(["pool", "fill", "busybox"], store)
            let members = templates.clones().records.filter { $0.state == .pooled }
            try #require(members.count == 2)
            #expect(members.allSatisfy { $0.templateDigest == (try? templates.template(named: try EntityName("busybox")))?.manifest.identity })
            // Both members as if an earlier template of this name had made them.
            let earlier = "sha256:" + String(repeating: "ab", count: 32)
            for member in members { try await templates.updateClone(member.id) { $0.templateDigest = earlier } }
            let handedOut = try JSONDecoder().decode(Clone.self, from: Data(try run(["clone", "busybox", "--json"], store).stdout.utf8))
            #expect(!handedOut.from_pool && !members.map(\.id).contains(handedOut.id), "a fresh clone, not a member of another template")
            #expect(await eventually { members.allSatisfy { $0.qemu?.isAlive == false } || templates.clones().records.filter { $0.state == .pooled }.count < 2 }, "the hand-out removed what it refused")
            _ = try run(["gc"], store)
            #expect(templates.clones().records.filter { $0.templateDigest == earlier }.isEmpty, "gc stops members of another template")
            #expect(await eventually { members.allSatisfy { $0.qemu?.isAlive == false } }, "and their QEMU")
        }

        @Test("a pool member refuses send and resume at once (exit 76) and stays pooled and paused")
        func memberRefusesSendAndResume() async throws {
            let store = try poolStore("poolsend")
            defer { cleanUp(store) }
            _ = try run(["pool", "set", "busybox", "--size", "1"], store)
            _ = try run(["pool", "fill", "busybox"], store)
            let member = try #require(try TemplateStore(root: store.root).clones().records.first { $0.state == .pooled })
            for arguments in [["send", member.id, "ping", "--timeout", "60"], ["resume", member.id]] {
                let refused = try CLI.run(arguments + store.arguments)
                #expect(refused.status == 76 && refused.stderr.contains("warm pool of 'busybox'"), "\(arguments): \(refused.status) \(refused.stderr)")
            }
            let qmp = try await QMPClient.connect(socketPath: TemplateStore(root: store.root).clonePaths(member.id).qmpSocket, timeout: .seconds(5))
            defer { qmp.close() }
            #expect(try await qmp.queryStatus().running == false, "the member's guest is still paused")
            #expect(try poolStatus(store).first?.ready == 1, "and still in its pool")
        }

        @Test("a member handed out with a name and a NIC and a disk gets them; a taken name leaves the member in the pool")
        func handOutWithDevices() async throws {
            let store = try poolStore("pooldev")
            defer { cleanUp(store) }
            let images = try TestImages()
            defer { images.remove() }
            _ = try run(["pool", "set", "busybox", "--size", "1"], store)
            _ = try run(["pool", "fill", "busybox"], store)
            _ = try run(["clone", "busybox", "--no-pool", "--name", "taken"], store)
            // (The same request again would be a retry, and get that clone: this one differs.)
            let refused = try CLI.run(["clone", "busybox", "--name", "taken", "--cow-limit", "8M"] + store.arguments)
            #expect(refused.status != 0 && refused.stderr.contains("already exists"), "\(refused.stderr)")
            #expect(try poolStatus(store).first?.ready == 1, "the member stayed in the pool")
            let clone = try JSONDecoder().decode(Clone.self, from: Data(try run(["clone", "busybox", "--json", "--name", "svc", "--nic", "user", "--disk", "path=\(images.raw),overlay=on"], store).stdout.utf8))
            #expect(clone.from_pool && clone.name == "svc")
            #expect(clone.devices.map(\.id) == ["nic0", "disk0"])
            let channel = ControlChannel(path: clone.control_socket)
            // A member's guest is running when its devices arrive: it takes them as a hot-plug.
            let mac = MACAddress.derived(seed: clone.id, index: 0)
            #expect(await eventually { (try? channel.request("ifaces", timeout: .seconds(30)))?.contains("eth0=\(mac)") == true })
            var disks = ""
            _ = await eventually { disks = (try? channel.request("disks")) ?? ""; return disks == "vda=1048576" }
            #expect(disks == "vda=1048576")
            #expect(try channel.request("read vda 0 8") == hex("raw-base"))
        }
    }
}
