import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// `vmtemplate create` end to end: the real CLI, real QEMU, the real busybox guest.
extension RealGuests {
    @Suite("create on a real guest", .serialized)
    struct CreateIntegrationTests {
        @Test("a template holds RAM, state and a manifest whose digests match, all read-only")
        func publishedTemplateIsComplete() async throws {
            let store = try await SharedTemplate.shared.store()
            let directory = store.templateDirectory(SharedTemplate.name)
            let files = try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
            #expect(files == ["boot.log", "manifest.json", "memory", "state"])
            for file in files {
                #expect(try FileStatus.read(path: "\(directory)/\(file)").mode == 0o444, "\(file) must be read-only")
            }
            #expect(try FileStatus.read(path: directory).mode == 0o555)

            let manifest = try TemplateStore(root: store.root).template(named: try EntityName(SharedTemplate.name)).manifest
            #expect(manifest.formatVersion == 1)
            #expect(manifest.name == SharedTemplate.name)
            #expect(manifest.machine.machineType.hasPrefix("pc-q35-"), "alias must be resolved to a versioned machine")
            #expect(manifest.machine.machineOptions == ["sata=off", "smbus=off", "usb=off", "hpet=off"])
            #expect(manifest.machine.memoryBytes == 256 * 1024 * 1024)
            #expect(manifest.machine.accelerator == .tcg, "this machine's KVM is PVM: auto must pick TCG")
            #expect(manifest.machine.vmgenid)
            #expect(manifest.migration.capabilities == ["x-ignore-shared"])
            #expect(manifest.migration.uriScheme == "file")
            #expect(manifest.memory.sizeBytes == 256 * 1024 * 1024)
            #expect(manifest.memory.sha256 == (try FileDigest.sha256(path: "\(directory)/memory")))
            #expect(manifest.state.sha256 == (try FileDigest.sha256(path: "\(directory)/state")))
            #expect(manifest.state.sizeBytes > 0 && manifest.state.sizeBytes < 16 * 1024 * 1024, "x-ignore-shared keeps RAM out of the state")
            #expect(manifest.boot.kernel.sha256 == (try FileDigest.sha256(path: "\(Checkout.root)/templates/busybox/out/vmlinuz")))
            #expect(manifest.qemu.version == (try QEMUBinary.probe(path: manifest.qemu.path)).version)
            #expect(manifest.templateArguments.contains { $0.contains("share=on") })
            #expect(manifest.timings.bootToReady > 0 && manifest.timings.total >= manifest.timings.bootToReady)

            let bootLog = try String(contentsOfFile: "\(directory)/boot.log", encoding: .utf8)
            #expect(bootLog.contains("VMTEMPLATE-READY"))
            #expect(store.stagingEntries().isEmpty)
            #expect(QEMUProcesses.using(store.root).isEmpty, "the template VM must be gone after create")
        }

        @Test("list shows the template, in a table and as JSON")
        func listShowsTemplate() async throws {
            let store = try await SharedTemplate.shared.store()
            let json = try CLI.run(["list", "--json"] + store.arguments)
            #expect(json.status == 0)
            let object = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
            let templates = object?["templates"] as? [[String: Any]]
            #expect(templates?.first?["name"] as? String == SharedTemplate.name)
            #expect(templates?.first?["memory_bytes"] as? Int == 256 * 1024 * 1024)
            #expect(object?["clones"] is [Any])

            let table = try CLI.run(["list"] + store.arguments)
            #expect(table.status == 0)
            #expect(table.stdout.contains("busybox") && table.stdout.contains("256 MiB"))
        }

        @Test("an existing name is refused and the template is left as it was")
        func existingName() async throws {
            let store = try await SharedTemplate.shared.store()
            let manifestPath = "\(store.templateDirectory(SharedTemplate.name))/manifest.json"
            let before = try FileDigest.sha256(path: manifestPath)
            let result = try CLI.run(["create", SharedTemplate.name, "--recipe", Checkout.busyboxRecipe] + store.arguments)
            #expect(result.status != 0)
            #expect(result.stderr.contains("already exists"))
            #expect(try FileDigest.sha256(path: manifestPath) == before)
            #expect(store.stagingEntries().isEmpty)
        }

        @Test("a guest that never prints its marker times out with its console, leaving nothing")
        func neverReady() async throws {
            let store = try TemporaryStore("never")
            defer { store.remove() }
            let recipe = try RecipeFile(changing: ["ready_marker": "NEVER-PRINTED"])
            defer { recipe.remove() }
            let result = try CLI.run(["create", "never", "--recipe", recipe.path, "--timeout", "6"] + store.arguments)
            #expect(result.status != 0)
            #expect(result.stderr.contains("did not print its ready marker 'NEVER-PRINTED'"))
            #expect(result.stderr.contains("VMTEMPLATE-READY"), "the error shows the last console lines")
            #expect(!FileManager.default.fileExists(atPath: store.templateDirectory("never")))
            #expect(store.stagingEntries().isEmpty)
            #expect(QEMUProcesses.using(store.root).isEmpty)
        }

        @Test("QEMU dying at start shows its own error, leaving nothing")
        func qemuDies() async throws {
            let store = try TemporaryStore("dies")
            defer { store.remove() }
            let recipe = try RecipeFile(changing: ["machine_options": ["no-such-property=on"]])
            defer { recipe.remove() }
            let result = try CLI.run(["create", "dies", "--recipe", recipe.path] + store.arguments)
            #expect(result.status != 0)
            #expect(result.stderr.contains("QEMU exited"))
            #expect(result.stderr.contains("no-such-property"), "QEMU's own message is shown")
            #expect(store.stagingEntries().isEmpty)
            #expect(QEMUProcesses.using(store.root).isEmpty)
        }

        @Test("a create killed with SIGKILL never shows in list, and gc kills its QEMU")
        func killedCreate() async throws {
            let store = try TemporaryStore("killed")
            defer { store.remove() }
            let running = try CLI.start(["create", "killed", "--recipe", Checkout.busyboxRecipe] + store.arguments)
            let ownerPath = "\(store.root)/staging/killed/owner.json"
            let qemuStarted = await eventually {
                StagingOwner.namesQEMU(ownerPath)
            }
            #expect(qemuStarted)
            kill(running.process.processIdentifier, SIGKILL)
            running.process.waitUntilExit()
            _ = running.result()
            #expect(QEMUProcesses.using(store.root).count == 1, "QEMU runs on in its own session")

            let list = try CLI.run(["list", "--json"] + store.arguments)
            #expect(list.status == 0)
            #expect(!list.stdout.contains("killed"))

            let gc = try CLI.run(["gc", "--json"] + store.arguments)
            #expect(gc.status == 0)
            #expect(gc.stdout.contains("\"removed_staging\":[\"killed\"]"))
            #expect(await eventually(timeout: .seconds(5)) { QEMUProcesses.using(store.root).isEmpty })
            #expect(store.stagingEntries().isEmpty)
        }

        @Test("concurrent creates and lists: each name made once, every list readable")
        func concurrentCreates() async throws {
            let store = try TemporaryStore("concur")
            defer { store.remove() }
            let creates = try ["a", "b", "a"].map { name in
                try CLI.start(["create", name, "--recipe", Checkout.busyboxRecipe, "--memory", "128M"] + store.arguments)
            }
            var lists: [CommandResult] = []
            for _ in 0..<5 {
                lists.append(try CLI.run(["list", "--json"] + store.arguments))
            }
            let results = creates.map { running in
                running.process.waitUntilExit()
                return running.result()
            }
            #expect(results[1].status == 0)
            // The two creates of 'a' race: exactly one wins, the other is refused with a reason.
            let sameName = [results[0], results[2]]
            #expect(sameName.filter { $0.status == 0 }.count == 1)
            let refused = sameName.first { $0.status != 0 }
            #expect(refused.map { $0.stderr.contains("being created") || $0.stderr.contains("already exists") } == true)
            for list in lists {
                #expect(list.status == 0)
                #expect((try? JSONSerialization.jsonObject(with: Data(list.stdout.utf8))) != nil)
            }
            let names = try TemplateStore(root: store.root).templates().templates.map(\.manifest.name)
            #expect(names == ["a", "b"])
            #expect(store.stagingEntries().isEmpty)
        }

        @Test("a full disk is found before booting, and during the save, leaving nothing", .enabled(if: Environment.isRoot, "needs root to mount a small tmpfs"))
        func diskFull() async throws {
            // 128 MiB of RAM, 8 MiB reserve, a little slack for the store's own files.
            let tmpfs = try TmpfsStore("full", size: "137M")
            defer { tmpfs.unmount() }
            let mountPoint = tmpfs.store

            // Too small from the start: refused before anything boots.
            let tooBig = try CLI.run(["create", "big", "--recipe", Checkout.busyboxRecipe, "--memory", "256M"] + mountPoint.arguments)
            #expect(tooBig.status != 0)
            #expect(tooBig.stderr.contains("not enough disk space"))

            // Room for the RAM file, but the disk fills up while the guest boots: the save fails.
            let running = try CLI.start(["create", "full", "--recipe", Checkout.busyboxRecipe, "--memory", "128M"] + mountPoint.arguments)
            let ownerPath = "\(mountPoint.root)/staging/full/owner.json"
            #expect(await eventually {
                StagingOwner.namesQEMU(ownerPath)
            })
            // Leave 32 KiB: enough for the console log, not for the device state (~300 KB).
            let free = try FileSystem.availableBytes(onFileSystemOf: mountPoint.root)
            try FileSystem.allocateFile(path: "\(mountPoint.root)/filler", size: free - 32 * 1024, mode: 0o600)
            running.process.waitUntilExit()
            let result = running.result()
            #expect(result.status != 0)
            #expect(result.stderr.contains("disk full") || result.stderr.contains("No space left") || result.stderr.contains("is full"), "got: \(result.stderr)")
            #expect(!FileManager.default.fileExists(atPath: "\(mountPoint.root)/templates/full"))
            #expect(mountPoint.stagingEntries().isEmpty)
            #expect(QEMUProcesses.using(mountPoint.root).isEmpty)
        }
    }

}

/// A copy of the busybox recipe with some keys changed, in a temporary file next to the original
/// (so its relative kernel and initrd paths still resolve).
struct RecipeFile {
    let path: String

    init(changing changes: [String: Any]) throws {
        let data = try Data(contentsOf: URL(fileURLWithPath: Checkout.busyboxRecipe))
        var object = try JSONSerialization.jsonObject(with: data) as? [String: Any] ?? [:]
        for (key, value) in changes { object[key] = value }
        path = "\(Checkout.root)/templates/busybox/test-\(UUID().uuidString.prefix(8)).json"
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: path))
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// Whether a staging entry's owner.json names its QEMU yet (its `qemu` is an object, not null).
enum StagingOwner {
    static func namesQEMU(_ path: String) -> Bool {
        guard let data = FileManager.default.contents(atPath: path),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return false }
        return object["qemu"] is [String: Any]
    }
}
