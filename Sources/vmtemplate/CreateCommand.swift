import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct Create: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Boot a guest, wait until it is ready, and save it as a template.",
        discussion: """
            The guest boots with its RAM in a file of the store; when it prints the recipe's ready \
            marker on its first serial port it is paused, its device state is saved without its \
            RAM (x-ignore-shared), and RAM + state + manifest.json are published read-only.

            Example: vmtemplate create busybox --recipe templates/busybox/template.json
            """
    )

    @Argument(help: "Template name: letters, digits, '.', '_' or '-', not starting with '.'.")
    var name: String

    @Option(help: ArgumentHelp("Recipe file (JSON) describing the guest.", valueName: "path"))
    var recipe: String

    @Option(help: ArgumentHelp("Guest memory, overriding the recipe (e.g. 256M, 1G).", valueName: "size"))
    var memory: String?

    @Option(help: "Virtual CPUs, overriding the recipe.")
    var cpus: Int?

    @Option(help: "Accelerator: auto picks KVM only where it can run ordinary guests, else TCG.")
    var accel: AcceleratorChoice = .auto

    @Option(help: ArgumentHelp("Seconds to wait for the ready marker, overriding the recipe.", valueName: "seconds"))
    var timeout: Double?

    @Option(help: ArgumentHelp("Only this group may read the template (files 0440, directory 0550); default: everyone (0444).", valueName: "group"))
    var group: String?

    @Flag(help: "Print the template's manifest as one JSON object on stdout.")
    var json = false

    @OptionGroup var store: StoreOptions
    @OptionGroup var qemu: QEMUOptions

    func validate() throws {
        try SecondsOption.checkTimeout(timeout, atMost: 86_400)
    }

    func run() async throws {
        try await reportingErrors {
            // Check the name first: nothing may touch the disk for a name that can never be valid.
            let templateName = try EntityName(name)
            var recipe = try Recipe.load(path: recipe)
            if let memory { recipe.memory = memory }
            if let cpus { recipe.cpus = cpus }
            let creator = TemplateCreator(store: try store.open(), qemu: try qemu.probe(), kvm: .probe())
            let request = CreateRequest(name: templateName, recipe: recipe, accelerator: accel, readyTimeout: timeout.map { .seconds(fractional: $0) }, group: group)
            let showProgress = Terminal.stderrIsTerminal
            let json = self.json
            try await interruptible {
                let manifest = try await creator.create(request) { phase in
                    if showProgress { Terminal.note("\(templateName): \(phase.rawValue)") }
                }
                if json {
                    try Terminal.printJSON(manifest)
                } else {
                    let t = manifest.timings
                    print("created template \(manifest.name): \(ByteSize(bytes: manifest.machine.memoryBytes)) RAM, \(manifest.machine.machineType), \(manifest.machine.accelerator.rawValue); boot to ready \(Self.format(t.bootToReady)), save \(Self.format(t.save)), digest \(Self.format(t.digest)), total \(Self.format(t.total))")
                }
            }
        }
    }

    private static func format(_ seconds: Double) -> String {
        seconds < 1 ? String(format: "%.0f ms", seconds * 1000) : String(format: "%.2f s", seconds)
    }
}
