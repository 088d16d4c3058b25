import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

extension OverLimitAction: ExpressibleByArgument {}

struct SchedulerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scheduler",
        abstract: "Watch every clone's copy-on-write memory and act on clones over their limit.",
        discussion: """
            Runs in the foreground (for systemd or a container). Every interval it measures each \
            clone's copy-on-write pages (/proc/PID/smaps) and pauses or kills those over their \
            --cow-limit, printing each action as one JSON line. It keeps no state of its own: \
            killed and started again, it carries on from the store. One per store.
            
            Example: vmtemplate scheduler --interval 1
            """
    )

    @Option(help: ArgumentHelp("Seconds between samples (default: the store's setting, 1).", valueName: "seconds"))
    var interval: Double?

    @Flag(help: "Sample once, act, and exit.")
    var once = false

    @OptionGroup var store: StoreOptions

    func validate() throws {
        try SecondsOption.checkInterval(interval)
    }

    func run() async throws {
        try await reportingErrors {
            let scheduler = Scheduler(store: try store.open())
            // Written straight to the file descriptor: print() buffers when stdout is a pipe or a
            // file, and a log that arrives late is no log.
            let log: @Sendable (String) -> Void = { line in
                FileHandle.standardOutput.write(Data((line + "\n").utf8))
            }
            if once {
                for action in try await scheduler.runOnce() { log(try JSONCoding.line(action)) }
                return
            }
            Terminal.note("scheduler watching \(scheduler.store.root)")
            try await scheduler.run(interval: interval, log: log)
        }
    }
}

struct Pause: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "pause", abstract: "Pause a running clone (its guest freezes, its memory stays) until 'resume'.", discussion: "list and inspect show it as paused by the user; the scheduler never resumes a clone.\n\nExample: vmtemplate pause web-1")

    @Argument(help: "Clone ID (or unambiguous prefix) or name.", completion: NameCompletion.clones)
    var clone: String

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let store = try store.open()
            let record = try await CloneLifecycle(store: store).pause(try store.findClone(clone))
            print("paused \(record.id) (\(TerminalText.escape(record.name)))")
        }
    }
}

struct Resume: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "resume", abstract: "Continue a paused clone.", discussion: "Example: vmtemplate resume web-1 --cow-limit 128M")

    @Argument(help: "Clone ID (or unambiguous prefix) or name.", completion: NameCompletion.clones)
    var clone: String

    @Option(help: ArgumentHelp("A new copy-on-write limit, so the scheduler does not pause it again at once.", valueName: "size"))
    var cowLimit: String?

    @OptionGroup var store: StoreOptions

    func run() async throws {
        try await reportingErrors {
            let store = try store.open()
            let limit = try cowLimit.map { try ByteSize(parsing: $0).bytes }
            let record = try await CloneLifecycle(store: store).resume(try store.findClone(clone), cowLimitBytes: limit)
            print("resumed \(record.id) (\(record.name))")
        }
    }
}

struct Settings: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "settings",
        abstract: "Show or change the store's limits: clones, memory budget, action over a clone's limit.",
        discussion: "Give 'none' to remove a limit. Example: vmtemplate settings --max-clones 64 --memory-budget 16G --action pause"
    )

    @Option(help: ArgumentHelp("Live clones admitted at most, or 'none'.", valueName: "N"))
    var maxClones: String?

    @Option(help: ArgumentHelp("Memory all live clones may commit together (each: its --cow-limit or guest RAM, plus QEMU's reserve), or 'none'.", valueName: "size"))
    var memoryBudget: String?

    @Option(help: "What the scheduler does to a clone over its limit: pause or kill.")
    var action: OverLimitAction?

    @Option(help: ArgumentHelp("Seconds between the scheduler's samples.", valueName: "seconds"))
    var interval: Double?

    @Option(help: ArgumentHelp("Rounds in a row the scheduler may fail to pause a clone over its limit before it stops it (1 to 100).", valueName: "N"))
    var pauseAttempts: Int?

    @Flag(help: "Print the settings as one JSON object.")
    var json = false

    @OptionGroup var store: StoreOptions

    func validate() throws {
        try SecondsOption.checkInterval(interval)
        if let pauseAttempts, !StoreSettings.pauseAttemptsRange.contains(pauseAttempts) {
            throw ValidationError("--pause-attempts must be 1 to 100.")
        }
    }

    func run() async throws {
        try await reportingErrors {
            let changing = maxClones != nil || memoryBudget != nil || action != nil || interval != nil || pauseAttempts != nil
            let store = try store.open(changing ? .readWrite : .readOnly)
            var settings = try store.settings()
            if changing {
                settings = try await store.updateSettings { settings in
                    if let maxClones {
                        if maxClones == "none" {
                            settings.maxClones = nil
                        } else if let value = Int(maxClones), value >= 0 {
                            settings.maxClones = value
                        } else {
                            throw VMTemplateError(.invalidArgument, "--max-clones takes a whole number or 'none', not '\(maxClones)'.")
                        }
                    }
                    if let memoryBudget {
                        settings.memoryBudgetBytes = memoryBudget == "none" ? nil : try ByteSize(parsing: memoryBudget).bytes
                    }
                    if let action { settings.overLimitAction = action }
                    if let interval { settings.intervalSeconds = interval }
                    if let pauseAttempts { settings.pauseAttempts = pauseAttempts }
                }
            }
            if json {
                try Terminal.printJSON(settings)
            } else {
                print(TextTable.render([
                    ["max clones", settings.maxClones.map(String.init) ?? "none"],
                    ["memory budget", settings.memoryBudgetBytes.map { ByteSize(bytes: $0).description } ?? "none"],
                    ["over-limit action", settings.overLimitAction.rawValue],
                    ["scheduler interval", "\(settings.intervalSeconds) s"],
                    ["pause attempts", "\(settings.pauseAttempts), then stop"],
                ]))
            }
        }
    }
}
