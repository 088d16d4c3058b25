import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

struct Exec: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in a clone's guest through its guest agent and print its output.",
        discussion: "For templates whose guest runs qemu-guest-agent (docs/guests.md). The command's own exit status becomes vmtemplate's; its output is printed escaped.\n\nExample: vmtemplate exec web-1 -- cat /etc/machine-id"
    )

    @Argument(help: "Clone ID or name.", completion: NameCompletion.clones)
    var clone: String

    @Argument(parsing: .postTerminator, help: "The program (looked up in the guest's PATH) and its arguments, after --.")
    var command: [String]

    @Option(help: ArgumentHelp("Seconds to wait for the command (and for the guest agent, which serves one client at a time).", valueName: "seconds"))
    var timeout: Double = 60

    @OptionGroup var store: StoreOptions

    func validate() throws {
        try SecondsOption.checkTimeout(timeout, atMost: 86_400)
        guard !command.isEmpty, command.count <= GuestCommand.maxArguments else {
            throw ValidationError("give the command to run after --, e.g. 'vmtemplate exec web-1 -- hostname' (at most \(GuestCommand.maxArguments) words).")
        }
    }

    func run() async throws {
        try await reportingErrors {
            let store = try store.open(.readOnly)
            let record = try store.findClone(clone)
            let arguments = command.first == "--" ? Array(command.dropFirst()) : command
            let result = try await CloneLifecycle(store: store).exec(arguments, in: record, timeout: .seconds(fractional: timeout))
            // The guest's bytes reach a terminal: escaped line by line, line ends kept.
            func shown(_ text: String) -> Data {
                Data(text.split(separator: "\n", omittingEmptySubsequences: false).map { TerminalText.escape(String($0)) }.joined(separator: "\n").utf8)
            }
            FileHandle.standardOutput.write(shown(result.output))
            FileHandle.standardError.write(shown(result.errorOutput))
            // The guest's numbers, bounded: a signal N is 128 + N, as a shell says it.
            if !result.succeeded {
                let status = result.signal.map { 128 + min(max($0, 1), 127) } ?? min(max(result.exitCode ?? 1, 1), 255)
                throw ExitCode(Int32(status))
            }
        }
    }
}

/// Runs a clone's per-clone steps through its guest agent (``GuestAgentSetup``): started by
/// `clone` before the restore, sent the steps and the agent connection on fd 3. Not for people.
struct GuestSetupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "guest-setup", abstract: "Run a new clone's guest agent steps (started by clone).", shouldDisplay: false)

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            var info = stat()
            guard fstat(GuestAgentSetup.helperDescriptor, &info) == 0, (info.st_mode & S_IFMT) == S_IFSOCK else {
                throw VMTemplateError(.invalidArgument, "guest-setup reads the channel clone passes it as fd 3, and fd 3 is no socket: it is started by clone, not by hand.")
            }
            let store = try store.open()
            // Nothing sent: the clone failed before it resumed.
            guard let (setup, agent) = try GuestAgentSetup.receive(on: GuestAgentSetup.helperDescriptor) else { return }
            await setup.runAndRecord(fd: agent, path: store.cloneLayout(setup.cloneID).instance.agentSocket, store: store)
        }
    }
}
