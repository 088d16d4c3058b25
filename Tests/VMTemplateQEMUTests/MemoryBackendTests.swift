import Testing

@testable import VMTemplateOS
@testable import VMTemplateQEMU

@Suite("memory-backend-file rules")
struct MemoryBackendTests {
    @Test("rom=auto takes the value of readonly", arguments: [true, false])
    func autoFollowsReadonly(readonly: Bool) {
        #expect(MemoryBackendOptions(share: false, readonly: readonly, rom: .auto).resolvedROM == readonly)
        #expect(MemoryBackendOptions(share: true, readonly: readonly, rom: nil).resolvedROM == readonly)
    }

    @Test("QEMU's own refusals, word for word")
    func refusals() {
        #expect(MemoryBackendOptions(share: false, readonly: false, rom: .on).validationError == "property 'rom' = 'on' is not supported with 'readonly' = 'off'")
        #expect(MemoryBackendOptions(share: true, readonly: false, rom: .on).validationError == "property 'rom' = 'on' is not supported with 'readonly' = 'off'")
        #expect(MemoryBackendOptions(share: true, readonly: true, rom: .off).validationError == "property 'rom' = 'off' is incompatible with 'readonly' = 'on' and 'share' = 'on'")
    }

    @Test("every other combination is accepted")
    func accepted() {
        var accepted = 0
        for share in [false, true] {
            for readonly in [false, true] {
                for rom in OnOffAuto.allCases {
                    let options = MemoryBackendOptions(share: share, readonly: readonly, rom: rom)
                    let refused = (rom == .on && !readonly) || (rom == .off && readonly && share)
                    #expect((options.validationError == nil) == !refused)
                    if !refused { accepted += 1 }
                }
            }
        }
        #expect(accepted == 9)
    }

    @Test("the clone's backend opens read-only, maps private, and gives the guest RAM")
    func cloneOptions() {
        let clone = MemoryBackendOptions.clone
        #expect(clone.openMode == .readOnly)
        #expect(clone.mapping == .private)
        #expect(!clone.resolvedROM)
        #expect(MemoryBackendOptions.template.mapping == .shared)
        #expect(MemoryBackendOptions.template.openMode == .readWrite)
    }

    @Test("the -object argument is rendered from the value, commas in paths doubled")
    func rendering() throws {
        let backend = MemoryBackendFile(path: "/srv/a,b/memory", sizeBytes: 268_435_456, options: .clone)
        #expect(try backend.objectArgument() == "memory-backend-file,id=ram0,mem-path=/srv/a,,b/memory,size=268435456,share=off,readonly=on,rom=off")
        let template = MemoryBackendFile(path: "/t/memory", sizeBytes: 1024, options: .template)
        #expect(try template.objectArgument() == "memory-backend-file,id=ram0,mem-path=/t/memory,size=1024,share=on,readonly=off")
    }

    @Test("a refused combination is never rendered")
    func refusedNotRendered() {
        let bad = MemoryBackendFile(path: "/t/memory", sizeBytes: 1024, options: MemoryBackendOptions(share: true, readonly: true, rom: .off))
        #expect(throws: VMTemplateError.self) { try bad.objectArgument() }
    }
}
