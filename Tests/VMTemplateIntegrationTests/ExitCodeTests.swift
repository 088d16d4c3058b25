import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// The exit statuses runtimes script against (docs/cli.md), one real failure each, and the JSON
/// error `--json` prints on stdout.
extension RealGuests {
    @Suite("exit codes", .serialized)
    struct ExitCodeTests {
        func expectExit(_ arguments: [String], _ status: Int32, saying expected: String, environment: [String: String] = [:]) throws {
            let result = try CLI.run(arguments, environment: environment)
            #expect(result.status == status, "\(arguments): exit \(result.status), expected \(status): \(result.stderr)")
            #expect(result.stderr.contains(expected), "\(arguments): \(result.stderr)")
        }

        @Test("usage 64, not found 66, exists 73, limits 69, integrity 65, invalid state 76, QEMU failure 71, timeout 75, permission 77; --json errors on stdout; --version")
        func everyCode() async throws {
            let store = try TemporaryStore("exit")
            defer {
                _ = try? CLI.run(["rm", "--all"] + store.arguments)
                store.remove()
            }
            let created = try CLI.run(["create", "busybox", "--recipe", Checkout.busyboxRecipe] + store.arguments)
            try #require(created.status == 0, "\(created.stderr)")

            try expectExit(["clone"] + store.arguments, 64, saying: "Missing expected argument")
            try expectExit(["clone", "busybox", "--nic", "tap="] + store.arguments, 64, saying: "not an interface name")
            try expectExit(["clone", "nope"] + store.arguments, 66, saying: "no template named 'nope'")
            try expectExit(["rm", "nope"] + store.arguments, 66, saying: "no clone with ID or name 'nope'")
            #expect(try CLI.run(["clone", "busybox", "--name", "one"] + store.arguments).status == 0)
            // A retry gets the clone it made (0); a name taken by a clone that differs is 73.
            #expect(try CLI.run(["clone", "busybox", "--name", "one"] + store.arguments).status == 0)
            try expectExit(["clone", "busybox", "--name", "one", "--cow-limit", "8M"] + store.arguments, 73, saying: "already exists with another copy-on-write limit")
            _ = try CLI.run(["settings", "--max-clones", "1"] + store.arguments)
            try expectExit(["clone", "busybox"] + store.arguments, 69, saying: "at most 1 live clones")
            _ = try CLI.run(["settings", "--max-clones", "64"] + store.arguments)
            _ = try CLI.run(["scheduler", "--once"] + store.arguments)
            // A paused clone does not answer: invalid state.
            let record = try #require(try TemplateStore(root: store.root).cloneRecord(try TemplateStore(root: store.root).findClone("one").id))
            let qmp = try await QMPClient.connect(socketPath: TemplateStore(root: store.root).clonePaths(record.id).qmpSocket, timeout: .seconds(10))
            try await qmp.stop()
            qmp.close()
            try expectExit(["send", "one", "ping"] + store.arguments, 76, saying: "is paused")
            let wrapper = try QEMUWrapper(body: "echo 'qemu: something is wrong' >&2; exit 3")
            defer { wrapper.remove() }
            try expectExit(["clone", "busybox", "--qemu", wrapper.path] + store.arguments, 71, saying: "QEMU")
            // A guest that does not answer in time: 75 (a restore's own timeout is at least 1 s, in
            // which it never fails here).
            _ = try CLI.run(["clone", "busybox", "--name", "slow"] + store.arguments)
            try expectExit(["send", "slow", "hash 512", "--timeout", "0.01"] + store.arguments, 75, saying: "did not answer")
            try expectExit(["clone", "busybox", "--timeout", "0.5"] + store.arguments, 64, saying: "at least 1.0")

            // Integrity: a template file changed behind the manifest's back.
            let state = "\(store.templateDirectory("busybox"))/state"
            chmod(state, 0o644)
            let handle = try #require(FileHandle(forUpdatingAtPath: state))
            try handle.seek(toOffset: 100)
            let byte = try handle.read(upToCount: 1) ?? Data([0])
            try handle.seek(toOffset: 100)
            try handle.write(contentsOf: Data([byte[0] ^ 0xff]))
            try handle.close()
            chmod(state, 0o444)
            try expectExit(["verify", "busybox"] + store.arguments, 65, saying: "does not match its manifest")

            if Environment.isRoot {
                let asNobody = try ShortCommand.run("/usr/bin/setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", Checkout.binary, "clone", "busybox", "--json", "--store", store.root])
                #expect(asNobody.status == 77, "\(asNobody.stderr)")
                let error = try JSONSerialization.jsonObject(with: Data(asNobody.stdout.utf8)) as? [String: [String: String]]
                #expect(error?["error"]?["code"] == "permissionDenied" && error?["error"]?["message"]?.contains("only its owner changes a store") == true, "\(asNobody.stdout)")
            }
            let version = try CLI.run(["--version"])
            #expect(version.status == 0 && version.stdout.hasPrefix("vmtemplate "))
        }
    }
}
