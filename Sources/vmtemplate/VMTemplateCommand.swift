import ArgumentParser
import Dispatch
import Foundation
import Synchronization
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// Every command names itself (`commandName:`): a name ArgumentParser derives from the type
/// costs a `String(describing:)` of it, whose dynamic cast scans the binary's ~8,700 conformance
/// records, once per command in the tree on every run (~1.5 ms of a 7 ms CLI start, measured with
/// perf; docs/benchmarks.md, "The clone path's own cost").
@main
struct VMTemplateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmtemplate",
        abstract: "Make VM templates once, then start ready VMs from them in milliseconds.",
        discussion: """
            A template is a booted guest paused at the moment it became ready: its RAM file, its \
            device state and a manifest. Clones map the RAM file private and read-only, so each one \
            costs only the pages its guest writes.

            Examples:
              vmtemplate doctor
              vmtemplate create busybox --recipe templates/busybox/template.json
              vmtemplate list --json
            """,
        version: "vmtemplate \(VMTemplateVersion.current)",
        subcommands: [Create.self, Clone.self, List.self, Inspect.self, Remove.self, Send.self, Exec.self, GuestSetupCommand.self, DeviceCommand.self, PoolCommand.self, Serve.self, APIRequest.self, Deposit.self, Push.self, Pull.self, Export.self, Import.self, Events.self, Completion.self, Pause.self, Resume.self, Verify.self, RemoveTemplate.self, SchedulerCommand.self, Settings.self, Explain.self, Doctor.self, GC.self]
    )

    /// The argument parser's own `main`, except that a usage error (a bad option, a failed
    /// validation: exit 64) also prints the `--json` error object a script reads on stdout, as
    /// every other failure does (``reportingErrors(_:)``).
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var asynchronous = command as? any AsyncParsableCommand {
                try await asynchronous.run()
            } else {
                try command.run()
            }
        } catch {
            if !(error is ExitCode), exitCode(for: error) == ExitCode(ExitStatus.code(for: .invalidArgument)), CommandLine.arguments.contains("--json") {
                let line = fullMessage(for: error).split(separator: "\n").first.map(String.init) ?? "invalid usage"
                let message = line.hasPrefix("Error: ") ? String(line.dropFirst("Error: ".count)) : line
                JSONFailure.print(code: .invalidArgument, message: message)
            }
            exit(withError: error)
        }
    }
}

/// ``ErrorBody`` on stdout: what `--json` prints instead of a result.
enum JSONFailure {
    static func print(code: VMTemplateError.Code, message: String) {
        try? Terminal.printJSON(ErrorBody(code: code, message: message))
    }
}

/// The bounds of the options that take seconds, checked and said the same way by every command.
enum SecondsOption {
    /// A wait: more than 0 seconds and at most `most` (NaN is neither).
    static func checkTimeout(_ value: Double?, atMost most: Int, option: String = "--timeout") throws {
        guard let value, !(value > 0 && value <= Double(most)) else { return }
        throw ValidationError("\(option) must be more than 0 and at most \(most) seconds.")
    }

    /// The scheduler's interval: what the store's settings accept.
    static func checkInterval(_ value: Double?) throws {
        let range = StoreSettings.intervalRange
        guard let value, !range.contains(value) else { return }
        throw ValidationError(String(format: "--interval must be %g to %g seconds.", range.lowerBound, range.upperBound))
    }
}

/// Options every command that touches the store takes.
struct StoreOptions: ParsableArguments {
    @Option(name: .customLong("store"), help: ArgumentHelp("Store directory (default: $VMTEMPLATE_STORE, else /var/lib/vmtemplate for root, ~/.local/share/vmtemplate otherwise).", valueName: "path"))
    var storePath: String?

    /// `.readOnly` for commands that only look: they never create a store and work on another
    /// user's.
    func open(_ mode: TemplateStore.Mode = .readWrite) throws -> TemplateStore {
        try TemplateStore(root: TemplateStore.defaultRoot(explicit: storePath), mode: mode)
    }
}

struct QEMUOptions: ParsableArguments {
    @Option(name: .customLong("qemu"), help: ArgumentHelp("qemu-system-x86_64 to use (default: $VMTEMPLATE_QEMU, else PATH).", valueName: "path"))
    var qemuPath: String?

    func probe() throws -> QEMUBinary {
        try QEMUBinary.probe(path: try QEMUBinary.locate(explicit: qemuPath))
    }

    /// `--qemu`, else `$VMTEMPLATE_QEMU`; nil: the binary that made the template.
    var explicitPath: String? {
        qemuPath ?? ProcessInfo.processInfo.environment[QEMUBinary.environmentVariable].flatMap { $0.isEmpty ? nil : $0 }
    }
}

extension AcceleratorChoice: ExpressibleByArgument {}

/// Runs a command body and turns library errors into one clear line on stderr and the exit status
/// of their kind (``ExitStatus``); with `--json`, also `{"error": {"code", "message"}}` on stdout.
/// Everything printed is escaped: messages and causes carry text from records, consoles and QEMU.
func reportingErrors(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as VMTemplateError {
        Terminal.error(error.message)
        if let cause = error.causeText {
            FileHandle.standardError.write(Data((cause.split(separator: "\n").map { "  \(TerminalText.escape(String($0)))" }.joined(separator: "\n") + "\n").utf8))
        }
        if CommandLine.arguments.contains("--json") {
            JSONFailure.print(code: error.code, message: error.message)
        }
        throw ExitCode(ExitStatus.code(for: error.code))
    } catch is CancellationError {
        throw ExitCode.failure
    } catch let exit as ExitCode {
        throw exit
    } catch let usage as ValidationError {
        throw usage
    } catch {
        // Not a library error (a bug: everything the library throws is one): still one line,
        // and the JSON a script expects.
        Terminal.error(VMTemplateError.oneLine(error))
        if CommandLine.arguments.contains("--json") { JSONFailure.print(code: .internalError, message: VMTemplateError.oneLine(error)) }
        throw ExitCode(ExitStatus.code(for: .internalError))
    }
}

/// The exit statuses runtimes can script against: stable, one per kind of failure, taken from
/// sysexits(3) where one fits (docs/cli.md). 0 is success, 1 anything not listed, 2 `explain`'s
/// "QEMU refuses this combination", 128 + N an interruption by signal N.
enum ExitStatus {
    static func code(for code: VMTemplateError.Code) -> Int32 {
        switch code {
        case .invalidArgument: 64      // EX_USAGE, as the argument parser's own usage errors
        case .integrityFailure: 65     // EX_DATAERR
        case .notFound: 66             // EX_NOINPUT
        case .limitExceeded: 69        // EX_UNAVAILABLE: refused by limits or admission
        case .internalError: 70        // EX_SOFTWARE
        case .qemuFailed: 71           // EX_OSERR
        case .exists: 73               // EX_CANTCREAT
        case .ioError: 74              // EX_IOERR
        case .timeout, .busy: 75       // EX_TEMPFAIL: try again later
        case .invalidState: 76         // the clone or template is not in a state for this
        case .permissionDenied: 77     // EX_NOPERM
        case .unsupported: 78          // EX_CONFIG: this host's QEMU or setup cannot do it
        }
    }
}

/// Runs `body` (a `create` or a `clone`) so that SIGINT, SIGTERM and SIGHUP cancel it: the
/// library then runs the same clean-up as for a failure (no QEMU left, nothing half-made), and the
/// command exits with 128 + the signal's number.
func interruptible(_ body: @escaping @Sendable () async throws -> Void) async throws {
    let task = Task { try await body() }
    let received = Mutex<Int32?>(nil)
    let sources = [SIGINT, SIGTERM, SIGHUP].map { number in
        signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
        source.setEventHandler {
            received.withLock { $0 = $0 ?? number }
            task.cancel()
        }
        source.resume()
        return source
    }
    defer { for source in sources { source.cancel() } }
    let result = await task.result
    if let number = received.withLock({ $0 }) {
        Terminal.error("interrupted by signal \(number): everything this command had started was stopped and removed.")
        throw ExitCode(128 + number)
    }
    try result.get()
}

enum Terminal {
    static var stderrIsTerminal: Bool { isatty(2) == 1 }

    static func error(_ message: String) {
        FileHandle.standardError.write(Data("vmtemplate: error: \(TerminalText.escape(message))\n".utf8))
    }

    static func note(_ message: String) {
        FileHandle.standardError.write(Data("vmtemplate: \(TerminalText.escape(message))\n".utf8))
    }

    static func printJSON(_ value: some Encodable) throws {
        print(TerminalText.escapeJSON(try JSONCoding.line(value)))
    }
}

/// The names shell completion offers for a template or clone argument: read from the store the
/// command line names (`--store PATH`), else the default one; nothing when it cannot be read.
enum NameCompletion {
    static func store(in words: [String]) -> TemplateStore? {
        let explicit = Array(zip(words, words.dropFirst())).last { $0.0 == "--store" }?.1
        return try? TemplateStore(root: TemplateStore.defaultRoot(explicit: explicit), mode: .readOnly)
    }

    static let templates: CompletionKind = .custom { words, _, _ in
        store(in: words)?.templates().templates.map(\.manifest.name).sorted() ?? []
    }

    static let clones: CompletionKind = .custom { words, _, _ in
        store(in: words)?.clones().records.filter { $0.state != .pooled && $0.state != .warming }.map(\.name).sorted() ?? []
    }

    static let templatesAndClones: CompletionKind = .custom { words, _, _ in
        guard let store = store(in: words) else { return [] }
        return (store.templates().templates.map(\.manifest.name) + store.clones().records.filter { $0.state != .pooled && $0.state != .warming }.map(\.name)).sorted()
    }
}
