import Foundation
import Testing

@testable import VMTemplateKit
@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

#if canImport(Glibc)
import Glibc
#endif

/// Paths of this checkout, found from this file's location.
enum Checkout {
    static let root: String = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static let busyboxRecipe = "\(root)/templates/busybox/template.json"
    static let debianRecipe = "\(root)/templates/debian/template.json"
    /// The `vmtemplate` executable `swift build` made next to the test bundle.
    /// `$VMTEMPLATE_TEST_BINARY` runs the tests against another build (an older commit's, to show
    /// that a test fails there: docs/reliability.md).
    static var binary: String {
        if let other = ProcessInfo.processInfo.environment["VMTEMPLATE_TEST_BINARY"], !other.isEmpty { return other }
        let candidates = [
            Bundle.main.bundleURL.appendingPathComponent("vmtemplate").path,
            Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("vmtemplate").path,
            "\(root)/.build/debug/vmtemplate",
        ]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[2]
    }
}

/// Whether the machine can run the integration tests (scripts/setup installs all of this).
enum Environment {
    static let hasQEMU = (try? QEMUBinary.locate(explicit: nil)) != nil
    static let hasGuest = FileManager.default.fileExists(atPath: "\(Checkout.root)/templates/busybox/out/vmlinuz")
    static let canRunGuests = hasQEMU && hasGuest
    static let hasDebianGuest = canRunGuests && FileManager.default.fileExists(atPath: "\(Checkout.root)/templates/debian/out/root.img")
    static let isRoot = getuid() == 0
}

/// A result of running the CLI.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
    /// Ended by a signal it did not handle (a trap, an abort, a kill): a crash unless the test sent it.
    var signaled = false
}

/// Runs the real `vmtemplate` binary, the way a container runtime would.
enum CLI {
    static func run(_ arguments: [String], environment: [String: String] = [:]) throws -> CommandResult {
        let process = try start(arguments, environment: environment)
        process.process.waitUntilExit()
        return process.result()
    }

    final class Running {
        let process: Process
        let stdoutPath: String
        let stderrPath: String

        init(process: Process, stdoutPath: String, stderrPath: String) {
            self.process = process
            self.stdoutPath = stdoutPath
            self.stderrPath = stderrPath
        }

        func result() -> CommandResult {
            let out = (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? ""
            let err = (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? ""
            try? FileManager.default.removeItem(atPath: stdoutPath)
            try? FileManager.default.removeItem(atPath: stderrPath)
            return CommandResult(status: process.terminationStatus, stdout: out, stderr: err, signaled: process.terminationReason == .uncaughtSignal)
        }
    }

    /// Starts the binary with its output captured to files (pipes could fill up and block it).
    static func start(_ arguments: [String], environment: [String: String] = [:]) throws -> Running {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Checkout.binary)
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let base = NSTemporaryDirectory() + "vmtemplate-cli-\(UUID().uuidString)"
        _ = FileManager.default.createFile(atPath: base + ".out", contents: nil)
        _ = FileManager.default.createFile(atPath: base + ".err", contents: nil)
        process.standardOutput = FileHandle(forWritingAtPath: base + ".out")
        process.standardError = FileHandle(forWritingAtPath: base + ".err")
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return Running(process: process, stdoutPath: base + ".out", stderrPath: base + ".err")
    }
}

/// A store on a tmpfs of its own, `size` (mount(8)'s form, "64M") at most: for tests of a full
/// disk (root only). `unmount()` lazily unmounts it and removes the directory.
struct TmpfsStore {
    let store: TemporaryStore

    init(_ label: String, size: String) throws {
        store = try TemporaryStore(label)
        let mount = try ShortCommand.run("/bin/mount", ["-t", "tmpfs", "-o", "size=\(size)", "tmpfs", store.root])
        guard mount.status == 0 else {
            try? FileManager.default.removeItem(atPath: store.root)
            throw VMTemplateError(.internalError, "mount of a \(size) tmpfs failed: \(mount.stderr)")
        }
    }

    func unmount() {
        _ = try? ShortCommand.run("/bin/umount", ["-l", store.root])
        try? FileManager.default.removeItem(atPath: store.root)
    }
}

/// A store in a temporary directory; `remove()` kills whatever QEMU it still has and deletes it.
struct TemporaryStore {
    let root: String

    init(_ label: String = "store") throws {
        // Short paths: Unix socket paths inside the store are limited to 107 bytes. The label is
        // kept whole: stale-fixture clean-up reads the PID in "shared-PID" back from it.
        precondition(label.utf8.count <= 24, "TemporaryStore labels must stay short (socket paths)")
        let base = "/tmp/vmt-\(label)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        root = base
    }

    var arguments: [String] { ["--store", root] }

    func templateDirectory(_ name: String) -> String { "\(root)/templates/\(name)" }

    func cloneDirectory(_ id: String) -> String { "\(root)/clones/\(id)" }

    func stagingEntries() -> [String] {
        (try? FileManager.default.contentsOfDirectory(atPath: "\(root)/staging")) ?? []
    }

    func remove() {
        for pid in QEMUProcesses.using(root) { kill(pid, SIGKILL) }
        _ = try? ShortCommand.run("/bin/chmod", ["-R", "u+w", root])
        try? FileManager.default.removeItem(atPath: root)
    }
}

extension TemporaryStore {
    /// A store of its own with templates of these names, each made from the busybox recipe: for
    /// tests that run a server on it, size its pools or count its clones (which the shared store's
    /// other tests would disturb).
    static func withTemplates(_ label: String, _ names: [String] = ["busybox"]) throws -> TemporaryStore {
        let store = try TemporaryStore(label)
        for name in names {
            let created = try CLI.run(["create", name, "--recipe", Checkout.busyboxRecipe] + store.arguments)
            try #require(created.status == 0, "\(created.stderr)")
        }
        return store
    }
}

/// QEMU processes found through /proc, for checking that nothing was left running.
enum QEMUProcesses {
    /// PIDs of live processes whose command line mentions `path`.
    static func using(_ path: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
                  let stat = ProcessStat.read(pid: pid), stat.state != "Z"
            else { return false }
            let commandLine = String(decoding: data, as: UTF8.self).replacingOccurrences(of: "\0", with: " ")
            return commandLine.contains("qemu") && commandLine.contains(path)
        }
    }
}

/// Waits for a condition with a deadline, checking often (no coarse sleeps).
func eventually(timeout: Duration = .seconds(30), _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}

/// One busybox template, made once per test run and shared by the tests that only read it.
actor SharedTemplate {
    static let shared = SharedTemplate()
    static let name = "busybox"
    private var store: TemporaryStore?

    func store() async throws -> TemporaryStore {
        if let store { return store }
        Self.removeStaleFixtures()
        let made = try TemporaryStore("shared-\(getpid())")
        let result = try CLI.run(["create", Self.name, "--recipe", Checkout.busyboxRecipe, "--json"] + made.arguments)
        guard result.status == 0 else {
            throw VMTemplateError(.internalError, "creating the shared busybox template failed", detail: result.stderr)
        }
        store = made
        return made
    }

    /// Stores of earlier test runs whose process is gone (Swift Testing has no global tear-down).
    private static func removeStaleFixtures() {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? []
        for entry in entries where entry.hasPrefix("vmt-shared-") {
            let pid = Int32(entry.dropFirst("vmt-shared-".count).prefix { $0 != "-" }) ?? 0
            // Only a test run that is gone (ESRCH): EPERM means another user's run is alive.
            if pid > 0, pid != getpid(), kill(pid, 0) != 0, errno == ESRCH {
                TemporaryStore(existing: "/tmp/\(entry)").remove()
            }
        }
    }
}

extension TemporaryStore {
    init(existing root: String) { self.root = root }
}

/// Every suite that boots real guests, one at a time: on two cores, guests booting in parallel
/// only slow each other down, and checks for leftover QEMU must not see another suite's clones.
@Suite("real guests", .serialized, .enabled(if: Environment.canRunGuests, "needs QEMU and the busybox guest: run scripts/setup"))
struct RealGuests {}

/// Prometheus' text format read by Prometheus' Python client's parser (python3-prometheus-client,
/// installed by `scripts/setup --for-tests`): a malformed line fails the parse.
struct PrometheusText {
    struct Sample: Decodable {
        var name: String
        var labels: [String: String]
        var value: Double
    }

    /// Family name (as written in `# TYPE`, `_total` kept) to type.
    var types: [String: String]
    var samples: [Sample]

    func value(_ name: String, _ labels: [String: String]) -> Double? {
        samples.first { $0.name == name && $0.labels == labels }?.value
    }

    static let script = """
        import json, re, sys
        from prometheus_client.parser import text_string_to_metric_families
        text = sys.stdin.read()
        samples = [{"name": s.name, "labels": s.labels, "value": s.value} for f in text_string_to_metric_families(text) for s in f.samples]
        types = dict(re.findall(r"^# TYPE (\\S+) (\\S+)$", text, re.M))
        print(json.dumps({"types": types, "samples": samples}))
        """

    static func parse(_ text: String) throws -> PrometheusText {
        let output = try Python.run(script, input: Data(text.utf8))
        guard output.status == 0 else {
            throw VMTemplateError(.invalidArgument, "Prometheus' parser refused the text: \(output.stderr)")
        }
        struct Parsed: Decodable { var types: [String: String]; var samples: [Sample] }
        let parsed = try JSONDecoder().decode(Parsed.self, from: output.stdout)
        return PrometheusText(types: parsed.types, samples: parsed.samples)
    }
}

/// Debian's python3 (not whatever `python3` is first on PATH): the one `scripts/setup
/// --for-tests` installs the checkers for.
enum Python {
    static func run(_ script: String, arguments: [String] = [], input: Data) throws -> (status: Int32, stdout: Data, stderr: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", script] + arguments
        let stdin = Pipe(), stdout = Pipe(), stderr = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        process.standardError = stderr
        try process.run()
        // Written from another thread: a large input and a large output would otherwise block
        // each other on full pipes.
        let writer = Thread {
            stdin.fileHandleForWriting.write(input)
            try? stdin.fileHandleForWriting.close()
        }
        writer.start()
        let out = stdout.fileHandleForReading.readDataToEndOfFile()
        let err = stderr.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, out, String(decoding: err, as: UTF8.self))
    }
}
