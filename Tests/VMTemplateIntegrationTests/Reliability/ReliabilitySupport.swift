import Foundation
import Testing

@testable import VMTemplateOS
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// How many trials a reliability scenario runs, and where its counts go.
///
/// `scripts/test` runs the fast part (a few trials each). The long part is the same tests with
/// more trials: `VMTEMPLATE_RELIABILITY=long scripts/test --filter ReliabilityTests`
/// (docs/reliability.md). Each scenario prints one line `reliability: SCENARIO tried N failed N
/// lost N` and, with `VMTEMPLATE_RELIABILITY_REPORT=FILE`, appends it to FILE as JSON.
enum Reliability {
    static var isLong: Bool { ProcessInfo.processInfo.environment["VMTEMPLATE_RELIABILITY"] == "long" }

    static func trials(fast: Int, long: Int) -> Int { isLong ? long : fast }

    /// One scenario's counts: `failed` is a trial whose outcome was wrong (an error where none was
    /// due, a crash, a hang); `lost` is a trial that left something behind or destroyed something
    /// (a QEMU running, a half-made entry listed, a file changed that must not change).
    final class Tally: @unchecked Sendable {
        // @unchecked: only the one test that owns the tally touches it, from one task at a time.
        let scenario: String
        private(set) var tried = 0
        private(set) var failed = 0
        private(set) var lost = 0
        private var notes: [String] = []

        init(_ scenario: String) { self.scenario = scenario }

        func trial(failed didFail: Bool, lost didLose: Bool, note: @autoclosure () -> String = "") {
            tried += 1
            if didFail { failed += 1 }
            if didLose { lost += 1 }
            if didFail || didLose { notes.append(note()) }
        }

        /// Prints and records the counts, and fails the test unless nothing failed or was lost.
        func finish(sourceLocation: SourceLocation = #_sourceLocation) {
            print("reliability: \(scenario) tried \(tried) failed \(failed) lost \(lost)")
            if let path = ProcessInfo.processInfo.environment["VMTEMPLATE_RELIABILITY_REPORT"],
               let line = try? JSONSerialization.data(withJSONObject: ["scenario": scenario, "tried": tried, "failed": failed, "lost": lost]),
               let handle = FileHandle(forWritingAtPath: path) ?? (FileManager.default.createFile(atPath: path, contents: nil) ? FileHandle(forWritingAtPath: path) : nil) {
                handle.seekToEndOfFile()
                handle.write(line + Data("\n".utf8))
                try? handle.close()
            }
            #expect(tried > 0, "scenario \(scenario) ran no trial", sourceLocation: sourceLocation)
            #expect(failed == 0 && lost == 0, "scenario \(scenario): \(notes.joined(separator: "; "))", sourceLocation: sourceLocation)
        }
    }

    /// Runs a command as `nobody` (the other user of the attack scenarios).
    static func asNobody(_ arguments: [String]) throws -> ShortCommand.Output {
        try ShortCommand.run("/usr/bin/setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] + arguments)
    }

    /// A process that is not QEMU, for records that claim it: it must survive whatever is done.
    static func bystander() throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sleep")
        process.arguments = ["300"]
        // Not the test's own output: a child left holding it would keep `swift test` waiting.
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Writes `record` (a JSON object, possibly hostile) as `clones/ID/record.json`, owned by `uid`.
    static func plant(_ json: String, id: String, in store: TemporaryStore, uid: uid_t = 0) throws {
        let directory = store.cloneDirectory(id)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = "\(directory)/record.json"
        try Data(json.utf8).write(to: URL(fileURLWithPath: path))
        chown(directory, uid, uid_t.max)
        chown(path, uid, uid_t.max)
    }

    /// A record as the store would write it, with fields replaced by `overrides` (raw JSON values).
    static func recordJSON(id: String, name: String, pid: Int32, startTime: UInt64, store: TemporaryStore, overrides: [String: String] = [:]) -> String {
        var fields: [String: String] = [
            "id": "\"\(id)\"", "name": "\"\(name)\"", "template": "\"busybox\"",
            "qemu": "{\"pid\": \(pid), \"startTime\": \(startTime)}",
            "created_at": "\"2020-01-01T00:00:00Z\"", "state": "\"running\"",
            "memory_file": "\"\(store.root)/templates/busybox/memory\"", "writable_template": "false",
            "qemu_arguments": "[]", "guest_memory_bytes": "268435456",
            // What records carried before 0.2 (their paths were believed then); ignored now.
            "paths": "{\"qmp_socket\": \"\(store.root)/clones/\(id)/qmp.sock\", \"serial_log\": \"\(store.root)/clones/\(id)/serial.log\", \"control_socket\": \"\(store.root)/clones/\(id)/control.sock\", \"qemu_log\": \"\(store.root)/clones/\(id)/qemu.log\"}",
        ]
        for (key, value) in overrides { fields[key] = value }
        return "{" + fields.map { "\"\($0.key)\": \($0.value)" }.joined(separator: ", ") + "}"
    }
}
