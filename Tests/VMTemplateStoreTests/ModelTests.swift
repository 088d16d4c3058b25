import Foundation
import Testing

@testable import VMTemplateOS
@testable import VMTemplateQEMU
@testable import VMTemplateStore

@Suite("names, versions, recipes, command lines")
struct ModelTests {
    /// This checkout, from this file's place in it.
    static let checkoutRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    @Test("valid names are accepted", arguments: ["busybox", "a", "web-1.2_x", "A9", String(repeating: "x", count: 64)])
    func validNames(name: String) throws {
        #expect(try EntityName(name).value == name)
    }

    @Test("names that could escape the store or confuse it are refused", arguments: ["", ".", "..", ".hidden", "a/b", "../x", "x y", "tab\t", "é", "a:b", String(repeating: "x", count: 65)])
    func invalidNames(name: String) {
        #expect(throws: VMTemplateError.self) { try EntityName(name) }
    }

    @Test("QEMU versions parse and compare")
    func versions() {
        #expect(QEMUVersion(parsing: "10.0.2 (Debian 1:10.0.2+ds-2)") == QEMUVersion(10, 0, 2))
        #expect(QEMUVersion(parsing: "7.2.0") == QEMUVersion(7, 2, 0))
        #expect(QEMUVersion(parsing: "8.2") == QEMUVersion(8, 2, 0))
        #expect(QEMUVersion(parsing: "garbage") == nil)
        #expect(QEMUVersion(7, 2) < .romAndFileMigration)
        #expect(!QEMUCapabilities(version: QEMUVersion(7, 2)).supportsROM)
        #expect(QEMUCapabilities(version: QEMUVersion(10, 0)).supportsFileMigration)
    }

    @Test("auto never picks a KVM that cannot run stock guests")
    func acceleratorChoice() throws {
        let pvm = KVMProbe(devicePath: "/dev/kvm", devicePresent: true, deviceUsable: true, modules: ["kvm", "kvm_pvm"], usableForStockGuests: false, reason: "PVM")
        let real = KVMProbe(devicePath: "/dev/kvm", devicePresent: true, deviceUsable: true, modules: ["kvm", "kvm_intel"], usableForStockGuests: true, reason: "ok")
        let none = KVMProbe(devicePath: "/dev/kvm", devicePresent: false, deviceUsable: false, modules: [], usableForStockGuests: false, reason: "no /dev/kvm")
        #expect(try Accelerator.resolve(.auto, kvm: pvm) == .tcg)
        #expect(try Accelerator.resolve(.auto, kvm: real) == .kvm)
        #expect(try Accelerator.resolve(.tcg, kvm: real) == .tcg)
        // An explicit kvm where KVM cannot run stock guests fails at once with doctor's reason,
        // instead of hanging until the ready timeout.
        let refused = #expect(throws: VMTemplateError.self) { try Accelerator.resolve(.kvm, kvm: pvm) }
        #expect(refused?.message.contains("PVM") == true)
        #expect(throws: VMTemplateError.self) { try Accelerator.resolve(.kvm, kvm: none) }
    }

    @Test("a recipe's relative paths are resolved against its own folder")
    func recipePaths() throws {
        let recipe = try Recipe.load(path: "\(Self.checkoutRoot)/templates/busybox/template.json")
        #expect(recipe.kernel == "\(Self.checkoutRoot)/templates/busybox/out/vmlinuz")
        #expect(recipe.initrd == "\(Self.checkoutRoot)/templates/busybox/out/initrd.img")
        #expect(recipe.memory == "256M")
        #expect(recipe.readyMarker == "VMTEMPLATE-READY")
    }

    @Test("a malformed recipe names what is wrong")
    func malformedRecipe() throws {
        let path = NSTemporaryDirectory() + "recipe-\(UUID().uuidString).json"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(#"{"append": "x"}"#.utf8).write(to: URL(fileURLWithPath: path))
        #expect {
            try Recipe.load(path: path)
        } throws: { error in
            (error as? VMTemplateError)?.message.contains("'kernel' is missing") ?? false
        }
        #expect(throws: VMTemplateError.self) { try Recipe.load(path: "/nonexistent/recipe.json") }
    }

    @Test("the template command line boots the kernel with shared RAM; a clone's waits for its state")
    func commandLines() throws {
        let machine = MachineSpec(machineType: "pc-q35-10.0", machineOptions: ["sata=off"], cpuModel: nil, cpus: 1, memoryBytes: 256 << 20, accelerator: .tcg, vmgenid: true)
        let paths = InstancePaths(directory: "/s/t")
        let template = QEMUCommandLine(
            name: "t", machine: machine,
            memory: MemoryBackendFile(path: "/s/t/memory", sizeBytes: 256 << 20, options: .template),
            paths: paths, launch: .boot(KernelBoot(kernel: "/k", initrd: "/i", append: "console=ttyS0"))
        )
        let arguments = try template.arguments()
        #expect(arguments.contains("pc-q35-10.0,memory-backend=ram0,sata=off"))
        #expect(arguments.contains("-kernel") && arguments.contains("-initrd"))
        #expect(arguments.contains("vmgenid,id=vmgenid0,guid=auto"))
        #expect(arguments.contains("-nodefaults"))
        #expect(!arguments.contains("-incoming"))

        var clone = template
        clone.launch = .incoming
        clone.memory.options = .clone
        clone.vmgenidGUID = "9a6e1d2c-0000-4000-8000-000000000001"
        let cloneArguments = try clone.arguments()
        #expect(!cloneArguments.contains("-kernel"), "clones restore from state and need no kernel")
        #expect(cloneArguments.suffix(2) == ["-incoming", "defer"])
        #expect(cloneArguments.contains { $0.hasSuffix("share=off,readonly=on,rom=off") })
    }

    @Test("QMP listens on the inherited fd 3 by default, or on its socket path when asked")
    func qmpEndpoint() throws {
        let machine = MachineSpec(machineType: "pc-q35-10.0", machineOptions: [], cpuModel: nil, cpus: 1, memoryBytes: 256 << 20, accelerator: .tcg, vmgenid: false)
        var commandLine = QEMUCommandLine(
            name: "c", machine: machine,
            memory: MemoryBackendFile(path: "/s/memory", sizeBytes: 256 << 20, options: .clone),
            paths: InstancePaths(directory: "/s/c"), launch: .incoming
        )
        let inherited = try commandLine.arguments()
        #expect(inherited.contains("socket,id=qmp,fd=3,server=on,wait=off"))
        #expect(inherited.contains("chardev=qmp,mode=control"))
        #expect(!inherited.contains("-qmp"))

        commandLine.qmp = .socketPath
        let bound = try commandLine.arguments()
        #expect(bound.contains("unix:/s/c/qmp.sock,server=on,wait=off"))
        #expect(!bound.contains("-mon"))
    }

    @Test("socket paths over 107 bytes are refused with advice")
    func socketLength() {
        let long = InstancePaths(directory: "/" + String(repeating: "d", count: 100))
        #expect(throws: VMTemplateError.self) { try long.checkSocketLengths() }
        #expect(throws: Never.self) { try InstancePaths(directory: "/var/lib/vmtemplate/staging/x").checkSocketLengths() }
    }
}

@Suite("process identities in records")
struct ProcessIdentityCodingTests {
    @Test("written as snake_case start_time; records from before 0.3 with startTime still read")
    func snakeCaseAndLegacy() throws {
        let written = String(decoding: try JSONEncoder().encode(ProcessIdentity(pid: 42, startTime: 1234)), as: UTF8.self)
        #expect(written.contains("\"start_time\":1234") && !written.contains("startTime"))
        let legacy = try JSONDecoder().decode(ProcessIdentity.self, from: Data(#"{"pid": 42, "startTime": 1234}"#.utf8))
        #expect(legacy == ProcessIdentity(pid: 42, startTime: 1234))
        let current = try JSONDecoder().decode(ProcessIdentity.self, from: Data(#"{"pid": 42, "start_time": 1234}"#.utf8))
        #expect(current == legacy)
    }
}

@Suite("JSON output")
struct JSONOutputTests {
    struct Inner: Codable, Equatable {
        var count: UInt64?
        var list: [String?]
    }

    struct Outer: Codable, Equatable {
        var name: String
        var absent: String?
        var inner: Inner?
        var inners: [Inner]
        var when: Date
        var ratio: Double
        var byName: [String: Int?]

        enum CodingKeys: String, CodingKey {
            case name, absent, inner, inners, when, ratio
            case byName = "by_name"
        }
    }

    @Test("absent values are written as null, never left out; everything else as JSONEncoder writes it; it reads back")
    func nullsWritten() throws {
        let value = Outer(name: "a\"b/c", absent: nil, inner: nil, inners: [Inner(count: nil, list: ["x", nil]), Inner(count: 7, list: [])],
                          when: Date(timeIntervalSince1970: 1_764_000_000), ratio: 0.1, byName: ["k": nil, "j": 2])
        let text = try JSONCoding.line(value)
        #expect(text == #"{"absent":null,"by_name":{"j":2,"k":null},"inner":null,"inners":[{"count":null,"list":["x",null]},{"count":7,"list":[]}],"name":"a\"b/c","ratio":0.1,"when":"2025-11-24T16:00:00Z"}"#)
        #expect(try JSONCoding.decoder().decode(Outer.self, from: Data(text.utf8)) == value)
        #expect(throws: EncodingError.self) { try JSONCoding.line(Outer(name: "", inners: [], when: Date(), ratio: .nan, byName: [:])) }
    }
}

@Suite("recipes: every key known, guest-agent settings checked")
struct RecipeTests {
    func decode(_ json: String) throws -> Recipe {
        try JSONDecoder().decode(Recipe.self, from: Data(json.utf8))
    }

    @Test("an unknown key is refused, naming it; disks default to raw overlay; guest_clock is still read")
    func keys() throws {
        #expect {
            try decode(#"{"kernel": "k", "ready_marker": "R", "hotplug_slot": 2}"#)
        } throws: { error in
            "\(error)".contains("unknown field 'hotplug_slot' in the recipe")
        }
        let recipe = try decode(#"{"kernel": "k", "disks": [{"path": "root.img"}], "guest_clock": "control-channel"}"#)
        #expect(recipe.disks == [RecipeDisk(path: "root.img", format: .raw, mode: .overlay)])
        #expect(recipe.guestClock == .controlChannel && recipe.readyWhen == .marker && !recipe.needsGuestAgent)
        let agent = try decode(#"{"kernel": "k", "ready_when": "guest-agent", "guest_setup": "guest-agent", "guest_commands": [["renew", "{hostname}"]]}"#)
        #expect(agent.needsGuestAgent)
        try agent.checkGuestAgentSettings()
        #expect(throws: VMTemplateError.self) { try decode(#"{"kernel": "k", "guest_commands": [["x"]]}"#).checkGuestAgentSettings() }
    }
}
