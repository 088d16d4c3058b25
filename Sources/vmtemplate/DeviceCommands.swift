import ArgumentParser
import Foundation
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

struct DeviceCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "device",
        abstract: "Hot-plug NICs and disks into a running clone, or remove them.",
        discussion: """
            Devices go into the empty PCIe root ports the template was made with ("hotplug_slots" \
            in its recipe, 4 by default). A NIC's tap is opened by vmtemplate, in the network \
            namespace given, and passed to QEMU; a disk's image is opened by vmtemplate and passed \
            the same way (docs/devices.md).

            Examples:
              vmtemplate device add web-1 --nic tap=tap1,netns=/run/netns/pod1
              vmtemplate device add web-1 --disk path=/srv/data.qcow2,format=qcow2,overlay=on
              vmtemplate device rm web-1 disk0
            """,
        subcommands: [Add.self, Remove.self, List.self]
    )

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "add", abstract: "Hot-plug NICs and disks into a running clone.", discussion: "Examples:\n  vmtemplate device add web-1 --nic tap=tap1,netns=/run/netns/pod1\n  vmtemplate device add web-1 --disk path=/srv/base.qcow2,format=qcow2,overlay=on --json")

        @Argument(help: "Clone ID (or unambiguous prefix) or name.", completion: NameCompletion.clones)
        var clone: String

        @Option(help: ArgumentHelp("tap=IFNAME[,netns=PATH][,mac=MAC], fd=N[,mac=MAC] (a tap this command inherited open) or user[,hostfwd=RULE][,mac=MAC]. Repeatable.", valueName: "spec"))
        var nic: [String] = []

        @Option(help: ArgumentHelp("path=FILE or fd=N (an image this command inherited open)[,format=raw|qcow2][,readonly=on][,overlay=on]. Repeatable.", valueName: "spec"))
        var disk: [String] = []

        @Option(help: ArgumentHelp("Seconds to wait for QEMU.", valueName: "seconds"))
        var timeout: Double = 10

        @Flag(help: "Print the devices added as JSON.")
        var json = false

        @OptionGroup var store: StoreOptions

        func validate() throws {
            if nic.isEmpty && disk.isEmpty { throw ValidationError("give at least one --nic or --disk.") }
            try SecondsOption.checkTimeout(timeout, atMost: 600)
        }

        func run() async throws {
            try await reportingErrors {
                let request = try DeviceRequest(parsingNICs: nic, disks: disk, descriptors: .inherited)
                let store = try store.open()
                let record = try store.findClone(clone)
                let timeout = Duration.seconds(fractional: timeout)
                let json = self.json
                try await interruptible {
                    let added = try await CloneDevices(store: store).add(request, to: record, timeout: timeout)
                    if json { return try Terminal.printJSON(added) }
                    for device in added { print(device.summary) }
                }
            }
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Unplug a device from a running clone.",
            discussion: "The guest is asked to release the device and must do so within --timeout; then its backend is removed and a disk's overlay deleted.\n\nExample: vmtemplate device rm web-1 disk0"
        )

        @Argument(help: "Clone ID (or unambiguous prefix) or name.", completion: NameCompletion.clones)
        var clone: String

        @Argument(help: "Device ID, as 'device list' shows it (nic0, disk1, ...).")
        var device: String

        @Option(help: ArgumentHelp("Seconds to wait for the guest to release the device.", valueName: "seconds"))
        var timeout: Double = 10

        @OptionGroup var store: StoreOptions

        func validate() throws {
            try SecondsOption.checkTimeout(timeout, atMost: 600)
            if !AttachedDevice.isValidID(device) { throw ValidationError("'\(TerminalText.escape(device))' is not a device ID: they look like nic0 or disk1 (vmtemplate device list CLONE).") }
        }

        func run() async throws {
            try await reportingErrors {
                let store = try store.open()
                let record = try store.findClone(clone)
                let (device, timeout) = (self.device, Duration.seconds(fractional: timeout))
                try await interruptible {
                    let removed = try await CloneDevices(store: store).remove(device, from: record, timeout: timeout)
                    print("removed \(removed.summary)")
                }
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List a clone's hot-plugged devices.", discussion: "Example: vmtemplate device list web-1 --json")

        @Argument(help: "Clone ID (or unambiguous prefix) or name.", completion: NameCompletion.clones)
        var clone: String

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var store: StoreOptions

        func run() async throws {
            try await reportingErrors {
                let store = try store.open(.readOnly)
                let devices = try store.findClone(clone).devices ?? []
                if json { return try Terminal.printJSON(devices) }
                for device in devices { print(device.summary) }
            }
        }
    }
}
