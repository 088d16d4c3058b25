import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Hash a template's files again and compare them with its manifest.",
        discussion: """
            'clone' checks a template's files quickly (size, mode, inode, modification time); \
            'verify' reads every byte (SHA-256) and names each file that differs. Exits 65 when any \
            file differs.

            Example: vmtemplate verify busybox --json
            """
    )

    @Argument(help: "Template to verify.", completion: NameCompletion.templates)
    var template: String

    @Flag(help: "Print the result as one JSON object.")
    var json = false

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let result = try store.open(.readOnly).verify(try EntityName(template))
            if json {
                try Terminal.printJSON(result)
            } else {
                print(TextTable.render([["FILE", "SHA-256", "RESULT"]] + result.files.map { file in
                    [file.name, file.actualSHA256 ?? "-", file.ok ? "ok" : file.problems.joined(separator: "; ")]
                }))
            }
            if !result.ok {
                let bad = result.files.filter { !$0.ok }.map(\.name).joined(separator: ", ")
                let message = "template '\(template)' does not match its manifest (\(bad)): it cannot be trusted; remove it (vmtemplate rm-template \(template)) and create it again."
                // With --json the result above is the one document on stdout (its "ok" says it).
                if json {
                    Terminal.error(message)
                    throw ExitCode(ExitStatus.code(for: .integrityFailure))
                }
                throw VMTemplateError(.integrityFailure, message)
            }
        }
    }
}

struct RemoveTemplate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rm-template",
        abstract: "Remove a template.",
        discussion: """
            Refused while clones of this store run from it; --force stops them first (QMP quit, \
            SIGTERM, SIGKILL, as 'rm' does). Clones another user made with --template-store keep \
            running: their QEMU has the memory file open.

            Example: vmtemplate rm-template busybox --force
            """
    )

    @Argument(help: "Template to remove.", completion: NameCompletion.templates)
    var template: String

    @Flag(help: "Stop the clones that use it first.")
    var force = false

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let name = try EntityName(template)
            let removed = try await TemplateRemoval(store: try store.open()).remove(name, force: force)
            for record in removed { print(TerminalText.escape("removed clone \(record.id) (\(record.name))")) }
            print("removed template \(name)")
        }
    }
}
