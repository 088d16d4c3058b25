import ArgumentParser
import Foundation
import Logging
import VMTemplateAPI
import VMTemplateKit
import VMTemplateOS
import VMTemplateStore

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the store's server: the runtime API on a Unix socket, the scheduler, and warm pools kept filled.",
        discussion: """
            One per store, for systemd or a container. The API is HTTP/1.1 + JSON on --socket \
            (default STORE/serve.sock, mode 0600; --socket-group opens it to a group): \
            docs/api.md and docs/api.openapi.json. Every request's caller is read from the \
            socket's peer credentials and logged. The CLI keeps working on the store directly \
            whether or not a server runs.

            Examples:
              vmtemplate serve --socket-group docker
              vmtemplate serve --metrics-file /var/lib/prometheus/node-exporter/vmtemplate.prom
            """
    )

    @Option(help: ArgumentHelp("The API's Unix socket (default: STORE/serve.sock).", valueName: "path"))
    var socket: String?

    @Option(help: ArgumentHelp("A group whose members may use the API too (the socket becomes 0660).", valueName: "group"))
    var socketGroup: String?

    @Option(help: ArgumentHelp("Seconds between the scheduler's rounds (default: the store's setting).", valueName: "seconds"))
    var interval: Double?

    @Option(help: ArgumentHelp("Milliseconds between two pool members being filled, so that filling leaves running clones CPU.", valueName: "ms"))
    var fillPause: Int = 100

    @Option(help: ArgumentHelp("Also write the metrics of GET /metrics to this file, atomically, for node_exporter's textfile collector (name it *.prom).", valueName: "path"))
    var metricsFile: String?

    @Option(help: ArgumentHelp("Seconds between two writes of --metrics-file.", valueName: "seconds"))
    var metricsInterval: Double = 15

    @Option(help: ArgumentHelp("Seconds an exited clone is kept (its record and logs, for its exit to be read) before the server removes it; 0 keeps it until it is removed.", valueName: "seconds"))
    var exitedRetention: Double = CloneWatcher.defaultRetention.seconds

    @Option(help: ArgumentHelp("How lines are logged to stderr: text (TIME LEVEL MESSAGE key=value...) or json (one object per line).", valueName: "format"))
    var logFormat: LogFormat = .text

    enum LogFormat: String, ExpressibleByArgument, CaseIterable {
        case text, json
    }

    @Flag(help: "Give each live clone metric series of its own (clone and name labels); off by default, since every clone would leave series behind in Prometheus.")
    var perCloneMetrics = false

    @OptionGroup var store: StoreOptions
    @OptionGroup var qemu: QEMUOptions

    func validate() throws {
        try SecondsOption.checkInterval(interval)
        if !(0...60_000).contains(fillPause) { throw ValidationError("--fill-pause must be 0 to 60000 ms.") }
        if !(exitedRetention >= 0 && exitedRetention <= 604_800) { throw ValidationError("--exited-retention must be 0 to 604800 seconds (a week).") }
        if !(metricsInterval >= 1 && metricsInterval <= 3600) { throw ValidationError("--metrics-interval must be 1 to 3600 seconds.") }
        if let metricsFile, metricsFile.isEmpty || metricsFile.hasSuffix("/") { throw ValidationError("--metrics-file takes a file path, e.g. /var/lib/node_exporter/textfile/vmtemplate.prom.") }
    }

    func run() async throws {
        try await reportingErrors {
            let store = try store.open()
            var configuration = StoreServer.Configuration(socketPath: socket ?? APIServer.defaultSocketPath(store: store))
            if let socketGroup {
                guard let entry = getgrnam(socketGroup) else { throw VMTemplateError(.notFound, "no group named '\(TerminalText.escape(socketGroup))': pass an existing --socket-group.") }
                configuration.socketGroup = entry.pointee.gr_gid
            }
            configuration.schedulerInterval = interval
            configuration.fillPause = .milliseconds(fillPause)
            configuration.metricsFile = metricsFile
            configuration.metricsInterval = .seconds(fractional: metricsInterval)
            configuration.explicitQEMU = qemu.explicitPath
            configuration.perCloneMetrics = perCloneMetrics
            configuration.exitedRetention = exitedRetention == 0 ? nil : .seconds(fractional: exitedRetention)
            let format: ServeLogHandler.Format = logFormat == .json ? .json : .text
            try await StoreServer(store: store, configuration: configuration).run(logger: Logger(label: "vmtemplate.serve") { _ in ServeLogHandler(format: format) })
        }
    }
}

/// A client for the API, for scripts on hosts without `curl --unix-socket`.
struct APIRequest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "api",
        abstract: "Send one request to 'vmtemplate serve' and print the answer's body.",
        discussion: "When the answer is an error (status 400 or more) it is printed and the command exits as the CLI does for that error's code (64 for a bad request, 66 not found, 73 exists, 69 limits, 77 permission denied...; 1 for an answer without one); 69 when no server answers on the socket, 77 when this user may not connect to it.\n\nExamples:\n  vmtemplate api GET /v1/pools\n  vmtemplate api POST /v1/clones '{\"template\": \"busybox\"}'"
    )

    @Argument(help: "GET, POST, PUT or DELETE.")
    var method: String

    @Argument(help: "The path, e.g. /v1/clones.")
    var path: String

    @Argument(help: "A JSON body.")
    var body: String?

    @Option(help: ArgumentHelp("The API's socket (default: STORE/serve.sock).", valueName: "path"))
    var socket: String?

    @OptionGroup var store: StoreOptions

    func validate() throws {
        guard ["GET", "POST", "PUT", "DELETE"].contains(method) else { throw ValidationError("the method is GET, POST, PUT or DELETE.") }
        guard path.hasPrefix("/"), !path.contains(where: { $0 == " " || $0 == "\r" || $0 == "\n" }) else { throw ValidationError("the path starts with / and has no spaces.") }
    }

    func run() throws {
        let (socketPath, owner) = ServerSocket.find(socket, store: store)
        let reply: UnixHTTPClient.Reply
        do {
            reply = try UnixHTTPClient(socketPath: socketPath, alsoTrusting: owner).request(method, path, body: body.map { Data($0.utf8) })
        } catch let error as VMTemplateError {
            Terminal.error(error.message)
            // No server: unavailable (69), as a store at its limits; not "not found" (66), which
            // an answer of 404 means.
            throw ExitCode(error.code == .notFound ? 69 : ExitStatus.code(for: error.code))
        }
        print(TerminalText.escapeJSON(String(decoding: reply.body, as: UTF8.self)), terminator: reply.body.last == 0x0a ? "" : "\n")
        if reply.status >= 400 {
            // The exit status the CLI has for the answer's error code: a script handles the API
            // and the CLI alike.
            let code = (try? JSONCoding.decoder().decode(ErrorBody.self, from: reply.body))?.code
            throw ExitCode(code.map(ExitStatus.code(for:)) ?? 1)
        }
    }
}

/// The server a client command talks to: its API socket and the store owner it may trust.
enum ServerSocket {
    static func find(_ socket: String?, store: StoreOptions) -> (path: String, owner: uid_t?) {
        let root = TemplateStore.defaultRoot(explicit: store.storePath)
        let defaultSocket = "\(root)/serve.sock"
        let socketPath = socket ?? defaultSocket
        // The store's owner serves it; a member of its socket's group is another user. Only for
        // the store's own socket: a --socket elsewhere is not the store owner's to serve.
        var info = stat()
        let owner: uid_t? = socketPath == defaultSocket && lstat(root, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR ? info.st_uid : nil
        return (socketPath, owner)
    }
}

/// Hands a descriptor to the server: what a member of the socket's group does to attach a tap or
/// an image it opened itself (HTTP carries no descriptors).
struct Deposit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deposit",
        abstract: "Hand an open tap or disk image to 'vmtemplate serve'; print the token that names it in an API request.",
        discussion: "The descriptor goes over the server's descriptor socket (beside its API socket: STORE/serve-fds.sock) with SCM_RIGHTS; the token answered serves this user, in one successful request, for 60 seconds (docs/api.md, \"Descriptors\"). A tap must be open on /dev/net/tun with IFF_TAP | IFF_NO_PI; an image O_RDONLY (for readonly or overlay disks) or O_RDWR.\n\nExamples:\n  vmtemplate deposit 3 3</srv/images/base.raw\n  vmtemplate api POST /v1/clones '{\"template\": \"busybox\", \"disks\": [{\"fd\": \"fd-…\", \"overlay\": true}]}'"
    )

    @Argument(help: ArgumentHelp("The number of a descriptor this command inherited open, 3 or more.", valueName: "fd"))
    var descriptor: Int32

    @Option(help: "What the descriptor must be: tap or disk (the server checks it either way).")
    var kind: DescriptorKind?

    @Option(help: ArgumentHelp("The API's socket (default: STORE/serve.sock); the descriptor socket is beside it.", valueName: "path"))
    var socket: String?

    @OptionGroup var store: StoreOptions

    enum DescriptorKind: String, ExpressibleByArgument, CaseIterable {
        case tap, disk
    }

    func validate() throws {
        guard descriptor >= 3 else { throw ValidationError("give a descriptor number of 3 or more (0 to 2 are the terminal's), e.g. 'vmtemplate deposit 3 3</srv/disk.img'.") }
        guard fcntl(descriptor, F_GETFD) >= 0 else { throw ValidationError("descriptor \(descriptor) is not open in this command: open it in the shell, e.g. 'vmtemplate deposit \(descriptor) \(descriptor)</srv/disk.img'.") }
    }

    func run() throws {
        let (socketPath, owner) = ServerSocket.find(socket, store: store)
        let client = DescriptorClient(socketPath: ServerFiles.descriptorSocketPath(beside: socketPath), alsoTrusting: owner)
        do {
            try Terminal.printJSON(try client.deposit(descriptor, kind: kind.flatMap { GivenDescriptor.Kind(rawValue: $0.rawValue) }))
        } catch let error as VMTemplateError {
            Terminal.error(error.message)
            throw ExitCode(ExitStatus.code(for: error.code))
        }
    }
}

/// Shell completion scripts, generated from the argument parser (what its hidden
/// `--generate-completion-script` prints), under a name people find.
struct Completion: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "completion",
        abstract: "Print the completion script for a shell.",
        discussion: """
            Install it where your shell looks (scripts/install-shell-support does all three). \
            Examples:
              vmtemplate completion bash > /etc/bash_completion.d/vmtemplate
              vmtemplate completion zsh > /usr/local/share/zsh/site-functions/_vmtemplate
              vmtemplate completion fish > /etc/fish/completions/vmtemplate.fish
            """
    )

    enum Shell: String, ExpressibleByArgument, CaseIterable {
        case bash, zsh, fish
    }

    @Argument(help: "bash, zsh or fish.")
    var shell: Shell

    func run() throws {
        let kind: CompletionShell = switch shell {
        case .bash: .bash
        case .zsh: .zsh
        case .fish: .fish
        }
        print(VMTemplateCommand.completionScript(for: kind))
    }
}
