import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateStore

struct Events: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "events",
        abstract: "Print the store's events: clones created, running, paused, resumed, exited and removed; pool members; templates.",
        discussion: """
            Read from the store's journal (STORE/events/), which every command and the server \
            write as they change the store; exits are noticed by 'vmtemplate serve'. Each event \
            has a seq: --since SEQ prints those after it, so a reader that stops misses nothing \
            when it starts again (docs/api.md, Events). The store's owner or root only; others \
            use GET /v1/events.

            Examples:
              vmtemplate events --follow
              vmtemplate events --since 1200 --json
            """
    )

    @Option(help: ArgumentHelp("Print the events after this seq (default: every event kept; with --follow, only new ones).", valueName: "seq"))
    var since: UInt64?

    @Flag(help: "Keep printing events as they are written, until interrupted.")
    var follow = false

    @Flag(help: "One JSON object per line, as GET /v1/events answers.")
    var json = false

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let store = try store.open(.readOnly)
            let journal = store.events
            let after = since ?? (follow ? journal.lastSeq() : 0)
            let reading = try journal.read(after: after)
            print(reading.events)
            guard follow else { return }
            var tail = EventJournal.Tail(journal, after: after, continuing: reading)
            while !Task.isCancelled {
                print(tail.next())
                try await Task.sleep(for: .milliseconds(100))
            }
        }
    }

    private func print(_ events: [StoreEvent]) {
        guard !events.isEmpty else { return }
        var text = ""
        for event in events {
            if json {
                guard let line = try? JSONCoding.line(event) else { continue }
                text += line + "\n"
            } else {
                text += Self.line(for: event) + "\n"
            }
        }
        FileHandle.standardOutput.write(Data(text.utf8))
    }

    /// `SEQ TIME TYPE [CLONE (NAME)] [TEMPLATE] [details]`, escaped: every field comes from a file.
    static func line(for event: StoreEvent) -> String {
        let time = ISO8601DateFormatter().string(from: event.time)
        var fields = [String(event.seq), time, event.type.rawValue]
        if let clone = event.clone { fields.append(event.name.map { $0 == clone ? clone : "\(clone) (\($0))" } ?? clone) }
        if let template = event.template { fields.append("template=\(template)") }
        if event.fromPool == true { fields.append("from_pool") }
        if let reason = event.reason { fields.append("reason=\(reason)") }
        if let status = event.exitStatus { fields.append("exit_status=\(status)") }
        if let signal = event.signal { fields.append("signal=\(signal)") }
        if let cow = event.cowBytes, let limit = event.limitBytes { fields.append("cow=\(ByteSize(bytes: cow))/\(ByteSize(bytes: limit))") }
        if let devices = event.devices { fields.append("devices=\(devices.joined(separator: ","))") }
        if let words = event.lastWords { fields.append("last_words=\"\(words)\"") }
        return TerminalText.escape(fields.joined(separator: "  "))
    }
}
