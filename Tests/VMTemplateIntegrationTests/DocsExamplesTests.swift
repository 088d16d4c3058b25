import Foundation
import Testing

@testable import VMTemplateOS
import VMTemplateStore

/// Every command the docs show is run: the `console` blocks of each `docs/*.md` and the README,
/// in order, each block as one `bash -e` script of its `$ ` lines, on a store that has the
/// busybox template (`$VMTEMPLATE_STORE`), in a scratch directory holding a `templates` link to
/// the checkout's. A block must succeed; one marked `console exit=N` must end with status N.
extension RealGuests {
    @Suite("the docs' examples", .serialized)
    struct DocsExamplesTests {
        struct Block {
            var file: String
            var line: Int
            var commands: [String]
            var expectedStatus: Int32
        }

        /// The `console` blocks of a Markdown text.
        static func blocks(in text: String, file: String) -> [Block] {
            var blocks: [Block] = []
            var current: Block?
            for (index, line) in text.components(separatedBy: "\n").enumerated() {
                if var block = current {
                    if line.hasPrefix("```") {
                        blocks.append(block)
                        current = nil
                    } else if line.hasPrefix("$ ") {
                        block.commands.append(String(line.dropFirst(2)))
                        current = block
                    }
                    continue
                }
                guard line.hasPrefix("```console") else { continue }
                let info = line.dropFirst("```console".count).trimmingCharacters(in: .whitespaces)
                let status = info.hasPrefix("exit=") ? Int32(info.dropFirst("exit=".count)) ?? -1 : 0
                current = Block(file: file, line: index + 1, commands: [], expectedStatus: status)
            }
            return blocks
        }

        static var documents: [String] {
            let docs = (try? FileManager.default.contentsOfDirectory(atPath: "\(Checkout.root)/docs")) ?? []
            return ["README.md"] + docs.filter { $0.hasSuffix(".md") }.sorted().map { "docs/\($0)" }
        }

        @Test("every console block of the docs runs as shown", arguments: documents)
        func examples(document: String) async throws {
            let text = try String(contentsOfFile: "\(Checkout.root)/\(document)", encoding: .utf8)
            let blocks = Self.blocks(in: text, file: document)
            guard !blocks.isEmpty else { return }
            let store = try await SharedTemplate.shared.store()
            let scratch = NSTemporaryDirectory() + "vmt-docs-\(UUID().uuidString.prefix(8))"
            try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: "\(scratch)/templates", withDestinationPath: "\(Checkout.root)/templates")
            defer {
                _ = try? CLI.run(["rm", "--all"] + store.arguments)
                for name in ((try? FileManager.default.contentsOfDirectory(atPath: "\(store.root)/templates")) ?? []) where name != SharedTemplate.name {
                    _ = try? CLI.run(["rm-template", name, "--force"] + store.arguments)
                }
                for (template, _) in (try? TemplateStore(root: store.root).pools.sizes()) ?? [:] {
                    _ = try? CLI.run(["pool", "set", template, "--size", "0"] + store.arguments)
                }
                try? FileManager.default.removeItem(atPath: scratch)
            }
            let binDirectory = URL(fileURLWithPath: Checkout.binary).deletingLastPathComponent().path
            for block in blocks {
                #expect(!block.commands.isEmpty, "\(block.file):\(block.line): a console block without a '$ ' command")
                let script = "set -e\n" + block.commands.joined(separator: "\n") + "\n"
                let result = try ShortCommand.run("/usr/bin/env", [
                    "PATH=\(binDirectory):/usr/sbin:/usr/bin:/sbin:/bin",
                    "VMTEMPLATE_STORE=\(store.root)",
                    "HOME=\(scratch)",
                    "/bin/bash", "-c", "cd \"$1\" && eval \"$2\"", "bash", scratch, script,
                ])
                #expect(result.status == block.expectedStatus,
                        "\(block.file):\(block.line): exited \(result.status), not \(block.expectedStatus):\n\(block.commands.joined(separator: "\n"))\n\(result.stdout)\n\(result.stderr)")
            }
        }

        @Test("the block reader finds commands, output and expected statuses")
        func reader() {
            let text = "intro\n```console\n$ vmtemplate list\nTEMPLATE ...\n$ vmtemplate rm x\n```\n```sh\n$ not run\n```\n```console exit=66\n$ vmtemplate inspect nope\n```\n"
            let blocks = Self.blocks(in: text, file: "t.md")
            #expect(blocks.map(\.commands) == [["vmtemplate list", "vmtemplate rm x"], ["vmtemplate inspect nope"]])
            #expect(blocks.map(\.expectedStatus) == [0, 66])
            #expect(blocks.map(\.line) == [2, 10])
        }
    }
}
