import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct Clone: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clone",
        abstract: "Start a VM from a template; returns once its guest runs.",
        discussion: """
            The clone's QEMU opens the template RAM file read-only and maps it private \
            (share=off,readonly=on,rom=off): the guest's writes become the clone's own \
            copy-on-write pages and the template never changes. QEMU runs detached; stop it with \
            'vmtemplate rm'.

            Example: vmtemplate clone busybox --name web-1 --json
            """
    )

    @Argument(help: "Template to clone.", completion: NameCompletion.templates)
    var template: String

    @Option(help: "Name for the clone (default: its ID).")
    var name: String?

    @Flag(name: .customLong("no-vmgenid"), help: "Keep the template's VM generation ID instead of giving the clone a fresh one.")
    var noVMGenID = false

    @Flag(help: "Where QEMU has no rom= (< 8.2), let clones open the template read-write (protected by the private mapping only).")
    var allowWritableTemplate = false

    @Option(name: .customLong("tcg-tb-size"), help: ArgumentHelp("TCG translation cache per clone in MiB (default: \(CloneRequest.defaultTranslationCacheMiB); QEMU's own default is up to 1 GiB).", valueName: "MiB"))
    var tcgTranslationCacheMiB: Int?

    @Option(help: ArgumentHelp("Seconds to wait for the restore.", valueName: "seconds"))
    var timeout: Double = 30

    @Option(help: ArgumentHelp("Copy-on-write memory the clone may use before the scheduler acts (e.g. 64M).", valueName: "size"))
    var cowLimit: String?

    @Option(help: "What the scheduler does over the limit: pause or kill (default: the store's setting).")
    var overLimit: OverLimitAction?

    @Option(help: ArgumentHelp("A NIC, hot-plugged before the guest runs: tap=IFNAME[,netns=PATH][,mac=MAC], fd=N[,mac=MAC] (a tap this command inherited open) or user[,hostfwd=RULE][,mac=MAC]. Repeatable.", valueName: "spec"))
    var nic: [String] = []

    @Option(help: ArgumentHelp("A disk, hot-plugged before the guest runs: path=FILE or fd=N (an image this command inherited open)[,format=raw|qcow2][,readonly=on][,overlay=on]. Repeatable.", valueName: "spec"))
    var disk: [String] = []

    @Flag(name: .customLong("no-pool"), help: "Restore a fresh clone even when the template's warm pool has a ready member.")
    var noPool = false

    @Flag(help: "Return only once the guest sees every --nic and --disk (asked over its control channel or guest agent), within --timeout; if it does not, the clone is printed and kept, and the exit status is 75.")
    var waitDevices = false

    @Flag(help: "Print the clone as one JSON object on stdout.")
    var json = false

    @Option(name: .customLong("template-store"), help: ArgumentHelp("Read the template from this store (another user's, read-only) and keep the clone in --store (default: $VMTEMPLATE_TEMPLATE_STORE, else --store).", valueName: "path"))
    var templateStore: String?

    @OptionGroup var store: StoreOptions
    @OptionGroup var qemu: QEMUOptions

    /// The same options the API's `POST /v1/clones` takes, parsed and checked by the library.
    var options: CloneOptions {
        CloneOptions(template: template, name: name, vmgenid: !noVMGenID, allowWritableTemplate: allowWritableTemplate, tcgTranslationCacheMiB: tcgTranslationCacheMiB, timeoutSeconds: timeout, cowLimit: cowLimit, overLimit: overLimit, nics: nic, disks: disk, noPool: noPool, waitDevices: waitDevices)
    }

    func run() async throws {
        try await reportingErrors {
            var request = try options.request(descriptors: .inherited)
            let store = try store.open()
            let templatesRoot = templateStore ?? ProcessInfo.processInfo.environment[TemplateStore.templateStoreEnvironmentVariable].flatMap { $0.isEmpty ? nil : $0 }
            let templates = try templatesRoot.map { try TemplateStore(root: $0, mode: .readOnly) }
            let engine = CloneEngine(store: store, templates: templates, explicitQEMU: qemu.explicitPath)
            // This very binary delivers the guest's clock and hostname, detached (GuestSetup).
            // This process exits as soon as the clone runs: a forked child of it waits for the
            // guest's answers to its clock and hostname (a thread would die with it, and its
            // replies would go to the runtime's first request).
            request.guestRepliesInChild = true
            // A guest agent's steps need more than a forked child: this same binary, detached.
            // /proc/self/exe: this very binary even if it was replaced or reached by a relative name.
            request.guestSetupHelper = "/proc/self/exe"
            let request2 = request
            let json = self.json
            try await interruptible {
                let (record, warning, created) = try await engine.clone(request2)
                if let warning { Terminal.note(warning) }
                if json {
                    var view = CloneLifecycle(store: store).view(of: record)
                    view.created = created
                    try Terminal.printJSON(view)
                } else {
                    print(record.id)
                }
                // Asked to wait and not seen: printed (the clone runs), and said by the status.
                if request2.waitForDevices && record.devicesReady == false { throw ExitCode(ExitStatus.code(for: .timeout)) }
            }
        }
    }
}

struct Remove: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rm",
        abstract: "Stop clones and remove their records.",
        discussion: "Each clone is asked to quit over QMP, then sent SIGTERM, then SIGKILL after the grace period.\n\nExamples:\n  vmtemplate rm web-1\n  vmtemplate rm --all"
    )

    @Argument(help: "Clone IDs (or unambiguous prefixes) or names.", completion: NameCompletion.clones)
    var clones: [String] = []

    @Flag(help: "Remove every clone in the store.")
    var all = false

    @Option(help: ArgumentHelp("Seconds to wait after each step of the stop ladder.", valueName: "seconds"))
    var grace: Double = 3

    @OptionGroup var store: StoreOptions

    func validate() throws {
        if !(grace >= 0 && grace <= 600) { throw ValidationError("--grace must be a number of seconds from 0 to 600.") }
        if all && !clones.isEmpty { throw ValidationError("give clone IDs or --all, not both.") }
        if !all && clones.isEmpty { throw ValidationError("give one or more clone IDs or names, or --all.") }
    }

    func run() async throws {
        try await reportingErrors {
            let store = try store.open()
            let lifecycle = CloneLifecycle(store: store)
            let records = all ? store.clones().records : try clones.map { try store.findClone($0) }
            var failures: [any Error] = []
            await withTaskGroup(of: (any Error)?.self) { group in
                for record in records {
                    group.addTask {
                        do {
                            let how = try await lifecycle.remove(record, grace: .seconds(fractional: grace))
                            print(TerminalText.escape("removed \(record.id) (\(record.name)): \(how.rawValue)"))
                            return nil
                        } catch let error as VMTemplateError where all && error.code == .notFound {
                            // Removed meanwhile by somebody else: gone, as --all asks.
                            return nil
                        } catch {
                            return error
                        }
                    }
                }
                for await failure in group { if let failure { failures.append(failure) } }
            }
            // One line each (every message names its clone), then the kind of the first.
            for failure in failures.dropLast() { Terminal.error(VMTemplateError.oneLine(failure)) }
            if let last = failures.last {
                throw VMTemplateError((failures.first as? VMTemplateError)?.code ?? .qemuFailed, VMTemplateError.oneLine(last))
            }
        }
    }
}

struct Send: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send",
        abstract: "Send one line to a clone's control channel and print the guest's reply.",
        discussion: "The built-in busybox guest answers ping, dirty N, free, random N and hash N (templates/busybox/README.md).\n\nExample: vmtemplate send web-1 ping"
    )

    @Argument(help: "Clone ID (or unambiguous prefix) or name.", completion: NameCompletion.clones)
    var clone: String

    @Argument(help: "The request line, e.g. 'ping' or 'dirty 64'.")
    var request: [String]

    @Option(help: ArgumentHelp("Seconds to wait for the reply.", valueName: "seconds"))
    var timeout: Double = 60

    @OptionGroup var store: StoreOptions

    func validate() throws {
        try SecondsOption.checkTimeout(timeout, atMost: 86_400)
    }

    func run() async throws {
        try await reportingErrors {
            let store = try store.open(.readOnly)
            let record = try store.findClone(clone)
            try await CloneLifecycle(store: store).refuseUnlessAnswering(record)
            // The store may be another user's: no link below it is followed to another socket.
            let reply = try ControlChannel(path: store.clonePaths(record.id).controlSocket, storeRoot: store.root).exchange(request.joined(separator: " "), timeout: .seconds(fractional: timeout))
            print(TerminalText.escape(reply))
        }
    }
}
