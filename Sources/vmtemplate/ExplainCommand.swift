import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct Explain: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "explain",
        abstract: "Explain what QEMU does with a memory-backend-file's share, readonly and rom.",
        discussion: """
            Tells whether QEMU (>= 8.2) accepts the combination and, if it does, how it opens the \
            file (readonly), how it maps it (share), whether the guest sees RAM or ROM (rom; auto \
            takes the value of readonly) and where guest writes go. Absent properties take QEMU's \
            defaults: share=off, readonly=off, rom=auto.

            With --file, the file is also opened the way QEMU would open it, as you (never created, \
            truncated or written; closed at once), to tell whether QEMU run as this user could use \
            it. QEMU started by another user (e.g. libvirt's) may get a different answer.

            Exit status: 0 when QEMU accepts the combination, 2 when QEMU refuses it (the \
            explanation is still printed), 64 when the options cannot be parsed.

            Examples:
              vmtemplate explain share=off,readonly=on,rom=off
              vmtemplate explain share=on,readonly=on,rom=off
              vmtemplate explain readonly=on --json
              vmtemplate explain share=off --file /srv/vm/memory
            """
    )

    @Argument(help: ArgumentHelp("The properties, e.g. share=off,readonly=on,rom=off (values: on/off, rom also auto).", valueName: "options"))
    var options: String

    @Option(help: ArgumentHelp("A memory file to check: can QEMU, run as you, open it the way these options ask?", valueName: "path"))
    var file: String?

    @Flag(help: "Print one JSON object.")
    var json = false

    func run() async throws {
        var refused = false
        try await reportingErrors {
            let parsed = try MemoryBackendOptions.parse(options)
            let explanation = MemoryBackendExplanation.explain(parsed.options, file: file)
            if json {
                try Terminal.printJSON(explanation)
            } else {
                for line in explanation.lines(defaulted: parsed.defaulted) { print(line) }
            }
            refused = !explanation.valid
        }
        // Not an error: the explanation is the answer; the status lets scripts tell.
        if refused { throw ExitCode(2) }
    }
}
