import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// Recipe disks and guest-agent settings on the busybox guest (cheap to boot): the template's
/// copies, their digests, what a clone opens, and the refusals.
extension RealGuests {
    @Suite("recipe disks and guest agent settings", .serialized)
    struct GuestDiskIntegrationTests {
        /// A raw disk of `megabytes` MiB with a recognisable first sector, in a temporary file.
        func rawDisk(_ megabytes: Int) throws -> String {
            let path = "/tmp/vmt-disk-\(UUID().uuidString.prefix(8)).raw"
            var bytes = [UInt8](repeating: 0, count: 512)
            for (index, byte) in Array("vmtemplate test disk".utf8).enumerated() { bytes[index] = byte }
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            guard truncate(path, off_t(megabytes) << 20) == 0 else { throw VMTemplateError(.ioError, "truncate") }
            return path
        }

        @Test("recipe disks become digest-pinned template files (0444, source untouched); clones open them read-only, an overlay disk through an overlay of their own, removed with the clone")
        func disksArePinned() async throws {
            let store = try TemporaryStore("disks")
            defer { store.remove() }
            let readonly = try rawDisk(4)
            let overlay = try rawDisk(8)
            defer { unlink(readonly); unlink(overlay) }
            let sourceDigest = try FileDigest.sha256(path: overlay)
            let recipe = try RecipeFile(changing: ["disks": [["path": readonly, "mode": "readonly"], ["path": overlay, "format": "raw", "mode": "overlay"]]])
            defer { recipe.remove() }
            let created = try CLI.run(["create", "d", "--recipe", recipe.path] + store.arguments)
            try #require(created.status == 0, "\(created.stderr)")

            let template = try TemplateStore(root: store.root).template(named: EntityName("d"))
            let disks = try #require(template.manifest.disks)
            #expect(disks.map(\.name) == ["disk0.raw", "disk1.raw"])
            #expect(template.manifest.machine.bootDisks == [BootDisk(format: .raw, mode: .readonly), BootDisk(format: .raw, mode: .overlay)])
            #expect(template.manifest.boot.disks?.map(\.path) == [readonly, overlay])
            for (disk, path) in zip(disks, template.diskPaths) {
                let status = try FileStatus.read(path: path, followingLinks: false)
                #expect(status.mode == 0o444 && disk.mode == 0o444)
                #expect(try FileDigest.sha256(path: path) == disk.sha256)
            }
            #expect(try FileDigest.sha256(path: overlay) == sourceDigest, "the recipe's own file is never written")
            let verified = try CLI.run(["verify", "d"] + store.arguments)
            #expect(verified.status == 0 && verified.stdout.contains("disk1.raw"), "\(verified.stdout)\(verified.stderr)")

            let cloned = try CLI.run(["clone", "d", "--json"] + store.arguments)
            try #require(cloned.status == 0, "\(cloned.stderr)")
            let id = try #require((try JSONSerialization.jsonObject(with: Data(cloned.stdout.utf8)) as? [String: Any])?["id"] as? String)
            let record = try #require(try TemplateStore(root: store.root).cloneRecord(id))
            let arguments = record.qemuArguments.joined(separator: " ")
            #expect(arguments.contains(#""filename":"\#(template.diskPaths[0])","node-name":"bootdisk0-image-file","read-only":true"#))
            #expect(arguments.contains(#""filename":"\#(template.diskPaths[1])","node-name":"bootdisk1-image-file","read-only":true"#))
            #expect(arguments.contains("virtio-blk-pci,id=bootdisk1,drive=bootdisk1,bus=pcie.0,addr=0x19"))
            let overlayFile = store.cloneDirectory(id) + "/bootdisk1.qcow2"
            #expect(FileManager.default.fileExists(atPath: overlayFile))
            #expect(!FileManager.default.fileExists(atPath: store.cloneDirectory(id) + "/bootdisk0.qcow2"), "a readonly disk gets no overlay")
            // The guest sees both disks, the template's bytes on them.
            let answer = try CLI.run(["send", id, "ping"] + store.arguments)
            #expect(answer.stdout == "pong\n", "\(answer.stderr)")
            _ = try CLI.run(["rm", id] + store.arguments)
            #expect(!FileManager.default.fileExists(atPath: overlayFile))
            #expect(try CLI.run(["verify", "d"] + store.arguments).status == 0, "a clone changed no template file")
        }

        @Test("a template disk changed after create is refused at clone, naming the file, and verify names it too")
        func changedDiskIsRefused() async throws {
            let store = try TemporaryStore("dchg")
            defer { store.remove() }
            let disk = try rawDisk(4)
            defer { unlink(disk) }
            let recipe = try RecipeFile(changing: ["disks": [["path": disk]]])
            defer { recipe.remove() }
            let created = try CLI.run(["create", "d", "--recipe", recipe.path] + store.arguments)
            try #require(created.status == 0, "\(created.stderr)")
            let copy = store.templateDirectory("d") + "/disk0.raw"
            chmod(copy, 0o644)
            let handle = try #require(FileHandle(forWritingAtPath: copy))
            try handle.seek(toOffset: 4096)
            try handle.write(contentsOf: Data("changed".utf8))
            try handle.close()
            chmod(copy, 0o444)

            let refused = try CLI.run(["clone", "d"] + store.arguments)
            #expect(refused.status != 0)
            #expect(refused.stderr.contains("disk0.raw does not match its manifest"), "\(refused.stderr)")
            #expect(QEMUProcesses.using(store.root).isEmpty)
            #expect(try TemplateStore(root: store.root).clones().records.isEmpty, "nothing is left of the refused clone")
            let verified = try CLI.run(["verify", "d"] + store.arguments)
            #expect(verified.status != 0 && verified.stdout.contains("content differs"), "\(verified.stdout)")
        }

        @Test("a guest whose agent never answers fails create within its timeout, saying what to do, leaving nothing")
        func agentNeverAnswers() async throws {
            let store = try TemporaryStore("noagent")
            defer { store.remove() }
            // The busybox guest has no qemu-guest-agent.
            let recipe = try RecipeFile(changing: ["ready_when": "guest-agent"])
            defer { recipe.remove() }
            let result = try CLI.run(["create", "n", "--recipe", recipe.path, "--timeout", "8"] + store.arguments)
            #expect(result.status != 0)
            #expect(result.stderr.contains("the guest agent did not answer within 8"), "\(result.stderr)")
            #expect(result.stderr.contains("install qemu-guest-agent in the guest"))
            #expect(!FileManager.default.fileExists(atPath: store.templateDirectory("n")))
            #expect(store.stagingEntries().isEmpty)
            #expect(QEMUProcesses.using(store.root).isEmpty)
        }

        @Test("recipes that cannot work are refused naming the key, before anything boots", arguments: [
            (#"{"no_such_key": 1}"#, "unknown field 'no_such_key' in the recipe"),
            (#"{"disks": [{"path": "/nonexistent/disk.raw"}]}"#, "recipe disk 0: disk image '/nonexistent/disk.raw' does not exist"),
            (#"{"disks": [{"path": "/etc/hostname", "size": 3}]}"#, "unknown field 'size' in a recipe's disk"),
            (#"{"guest_commands": [["true"]]}"#, "guest_commands run through the guest agent"),
            (#"{"ready_commands": [["true"]]}"#, "ready_commands run through the guest agent"),
            (#"{"ready_when": "guest-agent", "hotplug_slots": 20}"#, "hotplug_slots 20 leaves no room"),
        ])
        func refusedRecipes(change: String, message: String) throws {
            let store = try TemporaryStore("badr")
            defer { store.remove() }
            let recipe = try RecipeFile(changing: try JSONSerialization.jsonObject(with: Data(change.utf8)) as? [String: Any] ?? [:])
            defer { recipe.remove() }
            let result = try CLI.run(["create", "r", "--recipe", recipe.path] + store.arguments)
            #expect(result.status != 0)
            #expect(result.stderr.hasPrefix("vmtemplate: error: ") && result.stderr.contains(message), "\(result.stderr)")
            #expect(result.stderr.split(separator: "\n").count == 1, "one line: \(result.stderr)")
            #expect(!FileManager.default.fileExists(atPath: store.templateDirectory("r")))
            #expect(store.stagingEntries().isEmpty)
            #expect(QEMUProcesses.using(store.root).isEmpty)
        }
    }
}
