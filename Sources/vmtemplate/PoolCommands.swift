import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateStore

struct PoolCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool",
        abstract: "Warm pools: clones restored ahead of demand, handed out by 'clone' with a 'cont'.",
        discussion: """
            A pool member is restored, warmed (its guest has answered once, so its code is \
            translated) and paused; 'vmtemplate clone TEMPLATE' takes a ready one when there is \
            one and gives it its name, devices and clock (docs/pools.md). 'vmtemplate serve' keeps \
            pools filled; 'pool fill' fills once.

            Examples:
              vmtemplate pool set busybox --size 8
              vmtemplate pool fill busybox
              vmtemplate pool ls
            """,
        subcommands: [SetSize.self, Fill.self, List.self]
    )

    struct SetSize: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "set", abstract: "Set how many members a template's pool holds (0 drains it).", discussion: "Examples:\n  vmtemplate pool set busybox --size 8\n  vmtemplate pool set busybox --size 0")

        @Argument(help: "Template name.", completion: NameCompletion.templates)
        var template: String

        @Option(help: "Members to keep ready (0 to \(PoolIndex.maxPoolSize)).")
        var size: Int

        @OptionGroup var store: StoreOptions

        func validate() throws {
            if !(0...PoolIndex.maxPoolSize).contains(size) { throw ValidationError("--size must be 0 to \(PoolIndex.maxPoolSize).") }
        }

        func run() async throws {
            try await reportingErrors {
                let name = try EntityName(template)
                let pool = WarmPool(store: try store.open())
                let size = self.size
                try await interruptible {
                    let removed = try await pool.setSize(name, size)
                    print("pool \(name): size \(size)\(removed.isEmpty ? "" : ", removed \(removed.count) members")")
                }
            }
        }
    }

    struct Fill: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "fill", abstract: "Fill a template's pool to its size once, then return.", discussion: "Example: vmtemplate pool fill busybox")

        @Argument(help: "Template name.", completion: NameCompletion.templates)
        var template: String

        @Option(help: ArgumentHelp("Seconds each member may take to restore and warm.", valueName: "seconds"))
        var timeout: Double = 60

        @OptionGroup var store: StoreOptions
        @OptionGroup var qemu: QEMUOptions

        func validate() throws {
            try SecondsOption.checkTimeout(timeout, atMost: 600)
        }

        func run() async throws {
            try await reportingErrors {
                let name = try EntityName(template)
                let store = try store.open()
                let pool = WarmPool(store: store, explicitQEMU: qemu.explicitPath)
                guard (store.pools.sizes()[name.value] ?? 0) > 0 else {
                    throw VMTemplateError(.invalidState, "template '\(name)' has no pool: set one with 'vmtemplate pool set \(name) --size N'.")
                }
                let timeout = Duration.seconds(fractional: timeout)
                try await interruptible {
                    let made = try await pool.fill(name, timeout: timeout)
                    let status = pool.status().first { $0.template == name.value }
                    print("pool \(name): made \(made.count), \(status?.ready ?? 0) of \(status?.size ?? 0) ready")
                }
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "Each pool: its size, ready members, members being filled.", discussion: "Examples:\n  vmtemplate pool ls\n  vmtemplate pool ls --json")

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var store: StoreOptions

        func run() async throws {
            try await reportingErrors {
                let status = WarmPool(store: try store.open(.readOnly)).status()
                if json { return try Terminal.printJSON(status) }
                print(TextTable.render([["TEMPLATE", "SIZE", "READY", "FILLING"]] + status.map { [$0.template, String($0.size), String($0.ready), String($0.filling)] }))
            }
        }
    }
}
