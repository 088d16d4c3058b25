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

/// The Debian guest (templates/debian: systemd, an ext4 root disk, qemu-guest-agent), templated
/// and cloned: each clone's identity renewed through its agent, its root disk its own.
extension RealGuests {
    @Suite("the Debian guest", .serialized, .enabled(if: Environment.hasDebianGuest, "needs templates/debian/out: run scripts/setup --for-tests"))
    struct DebianGuestIntegrationTests {
        /// One Debian template for the suite (its create boots systemd under TCG: ~15 s).
        actor Fixture {
            static let shared = Fixture()
            private var made: TemporaryStore?

            func store() throws -> TemporaryStore {
                if let made { return made }
                // Named like the shared busybox store, so the next run removes it once this process is gone.
                let store = try TemporaryStore("shared-\(getpid())-deb")
                let created = try CLI.run(["create", "debian", "--recipe", Checkout.debianRecipe] + store.arguments)
                guard created.status == 0 else {
                    store.remove()
                    throw VMTemplateError(.internalError, "creating the Debian template failed", detail: created.stderr)
                }
                made = store
                return store
            }
        }

        func exec(_ clone: String, _ command: [String], _ store: TemporaryStore) throws -> CommandResult {
            try CLI.run(["exec", clone] + store.arguments + ["--"] + command)
        }

        @Test("three clones each answer guest-exec with their own hostname, a fresh machine-id, and a clock within 2 s of the host's; the template's disk keeps its digest")
        func identityRenewed() async throws {
            let store = try await Fixture.shared.store()
            let template = try TemplateStore(root: store.root).template(named: EntityName("debian"))
            let names = ["deb-a", "deb-b", "deb-c"]
            for name in names {
                let cloned = try CLI.run(["clone", "debian", "--name", name, "--no-pool"] + store.arguments)
                try #require(cloned.status == 0, "\(cloned.stderr)")
            }
            defer { for name in names { _ = try? CLI.run(["rm", name] + store.arguments) } }
            var machineIDs: Set<String> = []
            for name in names {
                // `exec` waits behind the clone's own setup on the agent's one channel: it finds it done.
                let answer = try exec(name, ["sh", "-c", "hostname; cat /etc/machine-id; date +%s.%N"], store)
                let host = Date().timeIntervalSince1970
                try #require(answer.status == 0, "\(answer.stderr)")
                let lines = answer.stdout.split(separator: "\n").map(String.init)
                try #require(lines.count == 3, "\(answer.stdout)")
                #expect(lines[0] == name)
                machineIDs.insert(lines[1])
                let guest = try #require(Double(lines[2]))
                #expect(abs(guest - host) < 2, "guest clock \(guest), host \(host)")
                let record = try TemplateStore(root: store.root).findClone(name)
                #expect(record.guestSetup == "done", "\(String(decoding: FileManager.default.contents(atPath: store.cloneDirectory(record.id) + "/guest-setup.log") ?? Data(), as: UTF8.self))")
            }
            #expect(machineIDs.count == 3, "every clone has its own machine-id: \(machineIDs)")
            #expect(!machineIDs.contains(Self.templateMachineID), "and none is the template's")
            let verified = try CLI.run(["verify", "debian", "--json"] + store.arguments)
            #expect(verified.status == 0, "\(verified.stdout)")
            #expect(template.manifest.disks?.count == 1)
        }

        /// The machine-id templates/debian/build writes into the image.
        static let templateMachineID: String = {
            let build = (try? String(contentsOfFile: "\(Checkout.root)/templates/debian/build", encoding: .utf8)) ?? ""
            return build.split(separator: "\n").first { $0.hasPrefix("machine_id=") }.map { String($0.dropFirst("machine_id=".count)).trimmingCharacters(in: CharacterSet(charactersIn: "\"'")) } ?? ""
        }()

        @Test("a file one clone writes on its root disk is seen by neither a sibling nor a new clone, and the template's disk keeps its digest")
        func writesStayPrivate() async throws {
            let store = try await Fixture.shared.store()
            for name in ["w-1", "w-2"] {
                let cloned = try CLI.run(["clone", "debian", "--name", name, "--no-pool"] + store.arguments)
                try #require(cloned.status == 0, "\(cloned.stderr)")
            }
            defer { for name in ["w-1", "w-2", "w-3"] { _ = try? CLI.run(["rm", name] + store.arguments) } }
            let wrote = try exec("w-1", ["sh", "-c", "echo mine > /root/private && sync && cat /root/private"], store)
            #expect(wrote.status == 0 && wrote.stdout == "mine\n", "\(wrote.stderr)")
            let sibling = try exec("w-2", ["cat", "/root/private"], store)
            #expect(sibling.status != 0 && sibling.stderr.contains("No such file"), "\(sibling.stdout)\(sibling.stderr)")
            let later = try CLI.run(["clone", "debian", "--name", "w-3", "--no-pool"] + store.arguments)
            try #require(later.status == 0, "\(later.stderr)")
            #expect(try exec("w-3", ["test", "-e", "/root/private"], store).status == 1)
            #expect(try CLI.run(["verify", "debian"] + store.arguments).status == 0)
        }

        @Test("a pool hands out warmed Debian clones whose setup runs at hand-out")
        func poolHandsOutDebian() async throws {
            let store = try await Fixture.shared.store()
            defer {
                _ = try? CLI.run(["pool", "set", "debian", "--size", "0"] + store.arguments)
                _ = try? CLI.run(["rm", "p-1"] + store.arguments)
            }
            #expect(try CLI.run(["pool", "set", "debian", "--size", "1"] + store.arguments).status == 0)
            let filled = try CLI.run(["pool", "fill", "debian"] + store.arguments)
            try #require(filled.status == 0, "\(filled.stderr)")
            let cloned = try CLI.run(["clone", "debian", "--name", "p-1", "--json"] + store.arguments)
            try #require(cloned.status == 0, "\(cloned.stderr)")
            let view = try #require(try JSONSerialization.jsonObject(with: Data(cloned.stdout.utf8)) as? [String: Any])
            #expect(view["from_pool"] as? Bool == true)
            #expect(view["guest_setup"] as? String == "running", "the clone path does not wait for the guest")
            let answer = try exec("p-1", ["hostname"], store)
            #expect(answer.status == 0 && answer.stdout == "p-1\n", "\(answer.stdout)\(answer.stderr)")
        }

        @Test("a Debian clone's hot-plugged NIC and disk appear in its guest (its udev loads their drivers from the root disk)")
        func devicesAppear() async throws {
            let store = try await Fixture.shared.store()
            let disk = "/tmp/vmt-ddisk-\(UUID().uuidString.prefix(8)).raw"
            #expect(FileManager.default.createFile(atPath: disk, contents: nil))
            #expect(truncate(disk, 8 << 20) == 0)
            defer { unlink(disk); _ = try? CLI.run(["rm", "dev-1"] + store.arguments) }
            let cloned = try CLI.run(["clone", "debian", "--name", "dev-1", "--no-pool", "--nic", "user", "--disk", "path=\(disk),overlay=on"] + store.arguments)
            try #require(cloned.status == 0, "\(cloned.stderr)")
            var seen = ""
            let appeared = await eventually(timeout: .seconds(60)) {
                let answer = try? exec("dev-1", ["sh", "-c", "ls /sys/class/net; ls /sys/block"], store)
                seen = answer?.stdout ?? ""
                let words = seen.split(whereSeparator: \.isWhitespace).map(String.init)
                return words.contains { $0 != "lo" && !$0.hasPrefix("vd") } && words.contains("vdb")
            }
            #expect(appeared, "the guest lists: \(seen)")
        }

        @Test("through the API: a Debian clone created by serve gets its setup from the server itself (done, its hostname its name)")
        func throughTheAPI() async throws {
            let store = try await Fixture.shared.store()
            let server = try CLI.start(["serve", "--socket", "\(store.root)/d.sock"] + store.arguments)
            defer {
                server.process.terminate()
                server.process.waitUntilExit()
                _ = try? CLI.run(["rm", "api-1"] + store.arguments)
            }
            let client = UnixHTTPClient(socketPath: "\(store.root)/d.sock")
            #expect(await eventually { (try? client.request("GET", "/v1/health"))?.status == 200 })
            let reply = try client.request("POST", "/v1/clones", body: Data(#"{"template": "debian", "name": "api-1", "no_pool": true}"#.utf8))
            try #require(reply.status == 201, "\(String(decoding: reply.body, as: UTF8.self))")
            let view = try #require(try JSONSerialization.jsonObject(with: reply.body) as? [String: Any])
            #expect(view["guest_setup"] as? String == "running")
            #expect((view["agent_socket"] as? String)?.hasSuffix("/agent.sock") == true)
            let answer = try exec("api-1", ["hostname"], store)
            #expect(answer.status == 0 && answer.stdout == "api-1\n", "\(answer.stdout)\(answer.stderr)")
            // The same through the API.
            let ran = try client.request("POST", "/v1/clones/api-1/exec", body: Data(#"{"command": ["sh", "-c", "hostname; exit 3"]}"#.utf8))
            let result = try JSONSerialization.jsonObject(with: ran.body) as? [String: Any]
            #expect(ran.status == 200 && result?["stdout"] as? String == "api-1\n" && result?["exit_code"] as? Int == 3, "\(String(decoding: ran.body, as: UTF8.self))")
            #expect(await eventually { (try? TemplateStore(root: store.root).findClone("api-1"))?.guestSetup == "done" })
        }
    }
}